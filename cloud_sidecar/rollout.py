"""Staged rollout of one TUF target: canary percentage, widening steps, pause, abort.

Owns ``<data_dir>/rollout.json`` (the running rollout). The devices' states come from
the audit log (``ota.device_status`` entries, written when the sidecar accepts a
device's ``ota/status``; the device is the topic's). Cohorts are the devices whose
``fleet_protocol.ota.rollout_bucket`` is below the target's *signed*
``rollout_percent``: widening re-signs the target with the next step's percentage.

``decide`` is pure: counts → ``hold`` | ``widen`` | ``abort`` | ``done``. Abort means:
the failing target's percentage goes to 0 (no new device takes it) and the earlier
adapter is published again under the next adapter version for every device (a
roll-forward: devices never move to a lower version).

Invariants: a rollout moves only forward through its steps; a paused or aborted rollout
never widens; every command is audited (``ota.rollout.*``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fleet_protocol.io.files import write_atomic
from fleet_protocol.ota import rollout_bucket

log = logging.getLogger(__name__)

FAILED_STATES = ("rolled_back", "failed", "rejected")


@dataclass(frozen=True)
class RolloutPolicy:
    steps: tuple[int, ...] = (10, 50, 100)
    min_devices: int = 3  # the abort threshold applies after this many reports
    max_failure_rate: float = 0.2
    confirm_share_to_widen: float = 0.9


@dataclass(frozen=True)
class Rollout:
    target: str
    adapter_version: int
    step: int = 0
    state: str = "running"  # running | paused | aborted | done
    steps: tuple[int, ...] = RolloutPolicy().steps

    @property
    def percent(self) -> int:
        return self.steps[self.step]


@dataclass(frozen=True)
class DeviceState:
    device: str
    state: str
    adapter_version: int
    reason: str


def load(path: Path) -> Rollout | None:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return Rollout(**{**raw, "steps": tuple(raw["steps"])})


def save(path: Path, rollout: Rollout) -> None:
    write_atomic(path, json.dumps(asdict(rollout)).encode(), 0o644)


def device_states(audit_lines: Iterable[bytes]) -> dict[str, DeviceState]:
    """The latest reported OTA state of each device, from audit log lines."""
    out: dict[str, DeviceState] = {}
    for line in audit_lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("kind") != "ota.device_status":
            continue
        d: dict[str, Any] = e.get("details", {})
        out[e["subject"]] = DeviceState(
            e["subject"],
            str(d.get("state")),
            int(d.get("adapter_version", 0)),
            str(d.get("reason", "")),
        )
    return out


def in_cohort(devices: Iterable[str], percent: int) -> list[str]:
    return sorted(d for d in devices if rollout_bucket(d) < percent)


def decide(
    rollout: Rollout,
    devices: Iterable[str],
    states: dict[str, DeviceState],
    policy: RolloutPolicy = RolloutPolicy(),
) -> tuple[str, dict[str, float]]:
    """What the rollout should do now, and the counts it decided on."""
    cohort = in_cohort(devices, rollout.percent)
    mine = [
        states[d]
        for d in cohort
        if d in states and states[d].adapter_version == rollout.adapter_version
    ]
    failed = sum(1 for s in mine if s.state in FAILED_STATES)
    confirmed = sum(1 for s in mine if s.state == "confirmed")
    counts = {
        "cohort": float(len(cohort)),
        "reported": float(len(mine)),
        "failed": float(failed),
        "confirmed": float(confirmed),
    }
    if rollout.state != "running":
        return "hold", counts
    if len(mine) >= policy.min_devices and failed / len(mine) > policy.max_failure_rate:
        return "abort", counts
    if cohort and confirmed >= policy.confirm_share_to_widen * len(cohort):
        return ("done" if rollout.step == len(rollout.steps) - 1 else "widen"), counts
    return "hold", counts


def widened(rollout: Rollout) -> Rollout:
    return replace(rollout, step=min(rollout.step + 1, len(rollout.steps) - 1))
