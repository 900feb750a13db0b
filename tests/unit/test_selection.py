"""The selection policy: reasons, their priority, and the byte bounds (buffer fill, uplink budget)."""

from __future__ import annotations

import numpy as np

from edge_daemon.config import SelectionConfig
from edge_daemon.selection import DAY_S, Selector, select

MB = 1024 * 1024
CFG = SelectionConfig(low_confidence=0.7, audit_fraction=0.0, max_buffer_bytes=10 * MB)


def _selector(cfg: SelectionConfig = CFG, sample_bytes: int = 10_000) -> Selector:
    return Selector(cfg, np.random.default_rng(0), sample_bytes)


def test_reasons_rank_disagreement_then_low_confidence_then_audit() -> None:
    rng = np.random.default_rng(0)
    always_audit = CFG.model_copy(update={"audit_fraction": 1.0})
    assert select("horn", 0.1, "siren", rng, CFG) == "disagreement"
    assert select("horn", 0.1, "horn", rng, CFG) == "low_confidence"
    assert select("horn", 0.9, None, rng, always_audit) == "audit"
    assert select("horn", 0.9, "horn", rng, CFG) is None


def test_audit_fraction_is_honoured_on_average() -> None:
    cfg = CFG.model_copy(update={"audit_fraction": 0.1})
    rng = np.random.default_rng(1)
    kept = sum(select("horn", 0.99, None, rng, cfg) == "audit" for _ in range(20_000))
    assert 1_700 < kept < 2_300


def test_buffer_fill_refuses_lower_priorities_first() -> None:
    s = _selector()
    at = {"pending_bytes": lambda: int(0.95 * 10 * MB)}
    assert s.decide("horn", 0.9, "siren", stream_s=0, **at) == "disagreement"
    assert s.decide("horn", 0.1, None, stream_s=1, **at) is None
    half = {"pending_bytes": lambda: int(0.6 * 10 * MB)}
    assert s.decide("horn", 0.1, None, stream_s=2, **half) == "low_confidence"
    assert s.stats["refused_buffer_full"] == 1


def test_pending_bytes_is_asked_only_for_candidates() -> None:
    def boom() -> int:
        raise AssertionError("asked")

    assert _selector().decide("horn", 0.99, "horn", stream_s=0, pending_bytes=boom) is None


def test_uplink_budget_bounds_kept_bytes_over_a_day() -> None:
    budget = 2_000_000
    s = _selector(CFG.model_copy(update={"uplink_bytes_per_day": budget}), sample_bytes=12_816)
    kept = 0
    for i in range(int(DAY_S)):  # every window disagrees: the worst case
        if s.decide("horn", 0.1, "siren", stream_s=float(i), pending_bytes=lambda: 0):
            kept += 12_816
    assert kept <= budget * (1 + 1 / 24)
    assert kept >= 0.9 * budget
    assert s.stats["kept_bytes"] == kept


def test_uplink_budget_keeps_a_reserve_for_disagreements() -> None:
    s = _selector(CFG.model_copy(update={"uplink_bytes_per_day": 2_400_000}), sample_bytes=10_000)
    # a full bucket holds one hour: 100_000 bytes; audits stop at half of it
    cfg_audit = {"pending_bytes": lambda: 0}
    s.cfg = s.cfg.model_copy(update={"audit_fraction": 1.0})
    audits = sum(
        s.decide("horn", 0.99, None, stream_s=0, **cfg_audit) == "audit" for _ in range(20)
    )
    assert audits == 5
    disagreements = sum(
        s.decide("horn", 0.99, "siren", stream_s=0, **cfg_audit) == "disagreement"
        for _ in range(20)
    )
    assert disagreements == 5
