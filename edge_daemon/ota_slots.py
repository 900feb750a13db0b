"""Two model slots, the update lifecycle and automatic rollback, persisted across crashes.

Owns ``<state>/ota/slots.json`` (the lifecycle record) and ``<state>/ota/slots/<dir>/``
(one directory per installed model: the merged int8 + fp32 of one adapter). At most two
directories are referenced: ``active`` and ``previous`` (the base model, which is never
overwritten, is the slot of last resort); a directory being staged is unreferenced
until the switch, and ``recover`` deletes unreferenced ones.

Lifecycle (``OtaState``), each transition persisted (temp → fsync → rename) *before*
its effect, then reported on ``fleet/v1/<device>/ota/status``::

    QUEUED → DOWNLOADING → VERIFYING → STAGED → ACTIVE → CONFIRMED
                 │              │          │        └──→ ROLLED_BACK (health window failed)
                 └──────────────┴──────────┴──────────→ FAILED     (nothing switched)

- STAGED: the adapter is merged into a fresh directory (the inactive slot), loaded in a
  shadow session beside the running one and checked (``shadow_check(candidate,
  golden)``: the golden clips signed with the adapter and the accuracy it must reach on
  them, ``GoldenClips``, when the target names them); capture keeps running on the
  active model throughout;
- ACTIVE: the record names the new slot, then ``swap`` replaces the classifier between
  two blocks (``listen.ModelSlot``): no gap in capture;
- the health window (``HealthWindow``) watches inference errors, latency and the share
  of confident predictions against the previous model's; a crash loop (more than
  ``max_boots_unconfirmed`` boots while ACTIVE) counts as failed health. Failure
  switches back to ``previous`` (ROLLED_BACK) and says so on the status topic.

Invariants: after any crash (SIGKILL in any state) ``recover`` returns a model that
loads (active, else previous, else the base) and a state consistent with it: an
interrupted install before the switch is reported FAILED with reason ``interrupted``
and the running model is the one before it; the record never names a directory that
is not complete (directories are completed, fsync'd, before the record names them).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from edge_daemon.errors import OtaError
from fleet_protocol.io.files import write_atomic
from fleet_protocol.messages import OtaState

log = logging.getLogger(__name__)

C = TypeVar("C")

IN_FLIGHT: tuple[OtaState, ...] = ("queued", "downloading", "verifying", "staged")
SETTLED: tuple[OtaState, ...] = ("confirmed", "rolled_back", "failed")


@dataclass(frozen=True)
class Slot:
    directory: str  # name under <state>/ota/slots/
    model: str  # int8 model file name inside it
    adapter_version: int
    sha256: str


@dataclass(frozen=True)
class Record:
    state: OtaState = "confirmed"
    active: Slot | None = None  # None: the base model
    previous: Slot | None = None
    target_version: int = 0
    reason: str = ""
    boots_unconfirmed: int = 0

    @staticmethod
    def from_json(data: bytes) -> Record:
        raw = json.loads(data)
        slots = {k: Slot(**raw[k]) if raw.get(k) else None for k in ("active", "previous")}
        return Record(
            state=raw["state"],
            target_version=int(raw["target_version"]),
            reason=str(raw["reason"]),
            boots_unconfirmed=int(raw["boots_unconfirmed"]),
            **slots,
        )


@dataclass(frozen=True)
class HealthPolicy:
    min_windows: int = 60
    max_error_rate: float = 0.05
    max_latency_s: float = 0.5  # per window, 95th percentile
    confident_at: float = 0.6
    min_confident_share_of_previous: float = 0.5
    max_boots_unconfirmed: int = 2


@dataclass
class HealthWindow:
    """Counts of one health window (main loop thread only)."""

    policy: HealthPolicy
    baseline_confident: float  # share of confident predictions under the previous model
    windows: int = 0
    errors: int = 0
    confident: int = 0
    latencies: list[float] = field(default_factory=list)

    def record(self, ok: bool, latency_s: float, top_probability: float) -> None:
        self.windows += 1
        self.errors += 0 if ok else 1
        self.confident += 1 if ok and top_probability >= self.policy.confident_at else 0
        self.latencies.append(latency_s)

    def verdict(self) -> tuple[str, str]:
        """``("pending"|"good"|"bad", reason)``."""
        p = self.policy
        if self.windows and self.errors / self.windows > p.max_error_rate and self.errors >= 3:
            return "bad", "inference_errors"
        if self.windows < p.min_windows:
            return "pending", ""
        lat = sorted(self.latencies)[int(0.95 * (len(self.latencies) - 1))]
        if lat > p.max_latency_s:
            return "bad", "latency"
        share = self.confident / self.windows
        if share < self.baseline_confident * p.min_confident_share_of_previous:
            return "bad", "confidence_drop"
        return "good", ""


@dataclass(frozen=True)
class GoldenClips:
    """Verified golden clips (``fleet_model.golden``) and the accuracy the candidate must reach."""

    path: Path
    min_accuracy: float


class SlotManager(Generic[C]):
    def __init__(
        self,
        state_dir: Path,
        *,
        build: Callable[[Path, Path], Path],
        load: Callable[[Path | None], C],
        shadow_check: Callable[[C, GoldenClips | None], str],
        swap: Callable[[C], None],
        report: Callable[[OtaState, int, str], None],
        policy: HealthPolicy = HealthPolicy(),
    ) -> None:
        self.dir = state_dir / "ota"
        self.slots_dir = self.dir / "slots"
        self._build = build
        self._load = load
        self._shadow_check = shadow_check
        self._swap = swap
        self._report = report
        self.policy = policy
        self.record = self._read()
        self.health: HealthWindow | None = None
        # observe() runs on the listener thread, installs on the update thread
        self._lock = threading.RLock()

    # ------------------------------------------------------------- persistence

    def _read(self) -> Record:
        try:
            return Record.from_json((self.dir / "slots.json").read_bytes())
        except FileNotFoundError:
            return Record()
        except (ValueError, KeyError, TypeError) as e:
            log.error("OTA slot record unreadable (%s): running the base model", e)
            return Record(state="failed", reason="record_unreadable")

    def _set(self, record: Record) -> None:
        with self._lock:
            write_atomic(self.dir / "slots.json", json.dumps(asdict(record)).encode())
            self.record = record
        self._report(record.state, record.target_version, record.reason)

    def model_path(self, slot: Slot | None) -> Path | None:
        return None if slot is None else self.slots_dir / slot.directory / slot.model

    # ------------------------------------------------------------------ recover

    def recover(self) -> C:
        """At boot: the model to run, and a record consistent with it (reported)."""
        r = self.record
        if r.state in IN_FLIGHT:  # killed before the switch: the active slot never changed
            r = replace(r, state="failed", reason="interrupted")
        elif r.state == "active":
            r = replace(r, boots_unconfirmed=r.boots_unconfirmed + 1)
            if r.boots_unconfirmed > self.policy.max_boots_unconfirmed:
                r = replace(
                    r, state="rolled_back", reason="crash_loop", active=r.previous, previous=None
                )
        model: C | None = None
        for candidate in (r.active, r.previous):
            if candidate is None:
                break  # the base model
            try:
                model = self._load(self.model_path(candidate))
                break
            except Exception as e:  # a damaged slot must not keep the device from listening
                log.error("slot %s does not load: %s", candidate.directory, e)
                r = replace(
                    r,
                    state="rolled_back",
                    reason="slot_unloadable",
                    active=r.previous,
                    previous=None,
                )
        if model is None:
            r = replace(r, active=None, previous=None)
            model = self._load(None)
        self._set(r)
        self._collect_garbage()
        if r.state == "active":
            self.health = HealthWindow(self.policy, baseline_confident=0.0)
        return model

    def _collect_garbage(self) -> None:
        keep = {s.directory for s in (self.record.active, self.record.previous) if s}
        if not self.slots_dir.exists():
            return
        for d in self.slots_dir.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ install

    def begin(self, target_version: int, state: OtaState = "queued") -> None:
        self._set(replace(self.record, state=state, target_version=target_version, reason=""))

    def fail(self, reason: str) -> None:
        self._set(replace(self.record, state="failed", reason=reason))

    def install(
        self,
        adapter: Path,
        version: int,
        sha256: str,
        baseline_confident: float,
        golden: GoldenClips | None = None,
    ) -> C:
        """Stage ``adapter`` (already verified) in the inactive slot, shadow-check, switch."""
        self._set(replace(self.record, state="verifying", target_version=version, reason=""))
        directory = f"v{version}-{sha256[:12]}-{time.monotonic_ns() % 10**9}"
        out = self.slots_dir / directory
        try:
            model_path = self._build(adapter, out)
            shadow = self._load(model_path)
            self._set(replace(self.record, state="staged"))
            reason = self._shadow_check(shadow, golden)
        except (OtaError, OSError, ValueError) as e:
            shutil.rmtree(out, ignore_errors=True)
            self.fail(type(e).__name__.lower()[:60])
            raise
        if reason:
            shutil.rmtree(out, ignore_errors=True)
            self.fail(reason)
            raise OtaError(f"shadow check failed: {reason}")
        slot = Slot(directory, model_path.name, version, sha256)
        with self._lock:
            self._switch(slot, shadow, baseline_confident)
        return shadow

    def _switch(self, slot: Slot, shadow: C, baseline_confident: float) -> None:
        self._set(
            replace(
                self.record,
                state="active",
                active=slot,
                previous=self.record.active,
                boots_unconfirmed=0,
            )
        )
        self._swap(shadow)  # between two blocks: capture never stops
        self.health = HealthWindow(self.policy, baseline_confident)

    # ------------------------------------------------------------------- health

    def observe(self, ok: bool, latency_s: float, top_probability: float) -> None:
        """One classified window while ACTIVE; confirms or rolls back when decided."""
        with self._lock:
            if self.health is None or self.record.state != "active":
                return
            self.health.record(ok, latency_s, top_probability)
            verdict, reason = self.health.verdict()
            if verdict == "good":
                self.health = None
                self._set(replace(self.record, state="confirmed", boots_unconfirmed=0))
                self._collect_garbage()
            elif verdict == "bad":
                self.roll_back(reason)

    def roll_back(self, reason: str) -> None:
        with self._lock:
            r = self.record
            previous = self._load(self.model_path(r.previous))
            self._set(
                replace(r, state="rolled_back", reason=reason, active=r.previous, previous=None)
            )
            self._swap(previous)
            self.health = None
        log.warning("OTA rolled back from adapter v%d: %s", r.target_version, reason)

    def report_current(self) -> None:
        """Say the recorded state again (after a restart, once the link is up)."""
        r = self.record
        self._report(r.state, r.target_version, r.reason)

    def status(self) -> dict[str, Any]:
        a = self.record.active
        return {
            "state": self.record.state,
            "reason": self.record.reason,
            "adapter_version": a.adapter_version if a else 0,
            "target_version": self.record.target_version,
        }
