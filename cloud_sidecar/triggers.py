"""When to train: a schedule and three drift signals, each decision audited.

``cloud-sidecar train --if-triggered`` (run daily by ``systemd/cloud-sidecar-train.timer``)
asks ``evaluate``; it trains only when a trigger fired:

- ``schedule``: the last training attempt is older than ``max_interval_days``;
- ``new_labels``: at least ``min_new_labels`` labelled samples more than at the last
  attempt;
- ``misprediction``: among labelled samples captured since the last attempt, the
  share the device's model got wrong (its ``predicted`` against the label) reaches
  ``misprediction_rate`` (with at least ``min_support`` of them);
- ``confidence_shift``: the devices' confidence on their random ``audit`` samples
  (what the fleet hears, not only hard cases) since the last attempt differs from the
  ``reference_days`` before it: two-sample Kolmogorov-Smirnov statistic at least
  ``confidence_ks`` with p < 0.01 (scipy), at least ``min_support`` samples each side.

Invariants: every evaluation is written to the audit log (``train.trigger``) with the
figures of every signal, fired or not; the state (``data_dir/triggers.json``: time and
labelled count of the last attempt) is replaced atomically, only after an attempt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import ks_2samp

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import TriggerConfig
from cloud_sidecar.store_api import TrainingData
from fleet_protocol.io.files import write_atomic

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TriggerDecision:
    fired: tuple[str, ...]
    figures: dict[str, Any]


def _state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"last_attempt_ms": 0, "n_labelled": 0}
    data: dict[str, Any] = json.loads(path.read_bytes()[:65536])
    return data


def evaluate(
    store: TrainingData,
    state_path: Path,
    cfg: TriggerConfig,
    audit: AuditLog,
    now_ms: int | None = None,
) -> TriggerDecision:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    state = _state(state_path)
    last = int(state["last_attempt_ms"])
    labelled = store.labelled_samples()
    figures: dict[str, Any] = {}
    fired: list[str] = []

    figures["days_since_last"] = round((now - last) / DAY_MS, 2) if last else None
    if not last or now - last >= cfg.max_interval_days * DAY_MS:
        fired.append("schedule")

    new = len(labelled) - int(state["n_labelled"])
    figures["new_labels"] = new
    if new >= cfg.min_new_labels:
        fired.append("new_labels")

    recent = [s for s in labelled if s.captured_at_ms >= last]
    wrong = sum(1 for s in recent if s.predicted and s.predicted != s.label)
    rate = wrong / len(recent) if recent else 0.0
    figures["misprediction"] = {"n": len(recent), "rate": round(rate, 4)}
    if len(recent) >= cfg.min_support and rate >= cfg.misprediction_rate:
        fired.append("misprediction")

    ref_from = (last or now) - int(cfg.reference_days * DAY_MS)
    before = store.sample_scores("audit", ref_from, last or now)
    after = store.sample_scores("audit", last, now + 1) if last else []
    shift: dict[str, Any] = {"n_reference": len(before), "n_recent": len(after)}
    if len(before) >= cfg.min_support and len(after) >= cfg.min_support:
        ks = ks_2samp(before, after)
        shift.update(statistic=round(float(ks.statistic), 4), p=float(ks.pvalue))
        if ks.statistic >= cfg.confidence_ks and ks.pvalue < 0.01:
            fired.append("confidence_shift")
    figures["confidence_shift"] = shift

    audit.append("train.trigger", "train", fired=fired, **figures)
    return TriggerDecision(tuple(fired), figures)


def record_attempt(store: TrainingData, state_path: Path, now_ms: int | None = None) -> None:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    state = {"last_attempt_ms": now, "n_labelled": len(store.labelled_samples())}
    write_atomic(state_path, json.dumps(state).encode(), 0o640)
