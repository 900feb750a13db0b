"""The selection policy: reasons, their priority, and the byte bounds (buffer fill, uplink budget)."""

from __future__ import annotations

import numpy as np

from edge_daemon.config import SelectionConfig
from edge_daemon.selection import DAY_S, Selector, select

MB = 1024 * 1024
CFG = SelectionConfig(low_confidence=0.7, audit_fraction=0.0, max_buffer_bytes=10 * MB)


def _selector(cfg: SelectionConfig = CFG, sample_bytes: int = 10_000) -> Selector:
    return Selector(cfg, np.random.default_rng(0), sample_bytes)


def test_reasons_rank_low_confidence_then_audit() -> None:
    rng = np.random.default_rng(0)
    always_audit = CFG.model_copy(update={"audit_fraction": 1.0})
    assert select(0.1, rng, always_audit) == "low_confidence"
    assert select(0.9, rng, always_audit) == "audit"
    assert select(0.9, rng, CFG) is None


def test_audit_fraction_is_honoured_on_average() -> None:
    cfg = CFG.model_copy(update={"audit_fraction": 0.1})
    rng = np.random.default_rng(1)
    kept = sum(select(0.99, rng, cfg) == "audit" for _ in range(20_000))
    assert 1_700 < kept < 2_300


def test_buffer_fill_refuses_lower_priorities_first() -> None:
    s = _selector(CFG.model_copy(update={"audit_fraction": 1.0}))
    fuller = {"pending_bytes": lambda: int(0.6 * 10 * MB)}
    assert s.decide(0.9, stream_s=0, **fuller) is None  # audit stops at half full
    assert s.decide(0.1, stream_s=1, **fuller) == "low_confidence"
    full = {"pending_bytes": lambda: int(0.95 * 10 * MB)}
    assert s.decide(0.1, stream_s=2, **full) is None  # low_confidence stops at 90 %
    assert s.stats["refused_buffer_full"] == 2


def test_pending_bytes_is_asked_only_for_candidates() -> None:
    def boom() -> int:
        raise AssertionError("asked")

    assert _selector().decide(0.99, stream_s=0, pending_bytes=boom) is None


def test_uplink_budget_bounds_kept_bytes_over_a_day() -> None:
    budget = 2_000_000
    s = _selector(CFG.model_copy(update={"uplink_bytes_per_day": budget}), sample_bytes=12_816)
    kept = 0
    for i in range(int(DAY_S)):  # every window is unsure: the worst case
        if s.decide(0.1, stream_s=float(i), pending_bytes=lambda: 0):
            kept += 12_816
    assert kept <= budget * (1 + 1 / 24)
    assert kept >= 0.9 * budget
    assert s.stats["kept_bytes"] == kept


def test_uplink_budget_keeps_a_reserve_for_low_confidence_windows() -> None:
    s = _selector(CFG.model_copy(update={"uplink_bytes_per_day": 2_400_000}), sample_bytes=10_000)
    # a full bucket holds one hour: 100_000 bytes; audits stop at half of it
    none_pending = {"pending_bytes": lambda: 0}
    s.cfg = s.cfg.model_copy(update={"audit_fraction": 1.0})
    audits = sum(s.decide(0.99, stream_s=0, **none_pending) == "audit" for _ in range(20))
    assert audits == 5
    unsure = sum(s.decide(0.1, stream_s=0, **none_pending) == "low_confidence" for _ in range(20))
    assert unsure == 5
