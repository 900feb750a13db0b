"""The OTA client's clock on a Pi without a real-time clock: a lower bound that never goes back.

Owns ``<state>/ota/clock.json`` (``{"floor": <unix seconds>}``, sealed by ``ota_state``:
a tampered or, once initialised, missing file sets ``tampered``, the floor is never
written again and the update client refuses updates). A Pi 5 without its RTC
battery boots with the time of the last shutdown (fake-hwclock) or 1970 until NTP
answers, and NTP is unauthenticated: an attacker on the network can set the clock
back and replay expired metadata (a freeze attack). The policy:

- ``now() = max(system clock, floor_at_boot + monotonic time since boot)``: the
  persisted floor plus elapsed monotonic time is a lower bound on the true time that an
  attacker cannot move back; the system clock can only move ``now()`` forward;
- the floor rises from verified metadata only: a verified timestamp expiring at ``E``
  was signed at or after ``E - timestamp_lifetime`` (the repository always signs with
  that lifetime), so that is a lower bound on the true time (``observe_timestamp``);
- ``checkpoint()`` persists ``floor_at_boot + elapsed`` (never the system clock, which
  could be set ahead to make every metadata expire for good): call it periodically and
  at shutdown so that the bound survives reboots.

A clock set ahead can only make metadata look expired (denial of service, which TUF
accepts); a clock set back cannot make expired metadata look fresh.

Invariants: the persisted floor never decreases; it is written temp → fsync → rename
with its MAC; a floor read from a file whose MAC does not verify is never used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_daemon.ota_state import SealedFile

log = logging.getLogger(__name__)


class TrustedClock:
    def __init__(
        self,
        path: Path,
        *,
        state_key: bytes,
        timestamp_lifetime: timedelta,
        system_now: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._file = SealedFile(path, state_key)
        self._lifetime = timestamp_lifetime
        self._system_now = system_now
        self._monotonic = monotonic
        self._boot_floor = self._load()
        self._boot_mono = monotonic()

    @property
    def tampered(self) -> str:
        """Why the persisted floor is not trusted ("" when it is)."""
        return self._file.tampered

    def _load(self) -> float:
        body = self._file.load()
        if body is None:
            return 0.0  # first boot, or tampered (then nothing is written and updates stop)
        floor = body.get("floor")
        if not isinstance(floor, (int, float)) or isinstance(floor, bool):
            self._file.tampered = "floor is not a number"
            return 0.0
        return float(floor)

    def _persist(self) -> None:
        if self._file.tampered:
            log.warning("OTA clock floor not persisted: the file is tampered")
            return
        self._file.save({"floor": self._boot_floor})

    def ensure_persisted(self) -> None:
        """Write the floor when no file exists yet (first boot, before the trusted root)."""
        self._file.ensure({"floor": self._boot_floor})

    def floor(self) -> datetime:
        """The lower bound on the true time: persisted floor + elapsed monotonic time."""
        elapsed = max(0.0, self._monotonic() - self._boot_mono)
        return datetime.fromtimestamp(self._boot_floor + elapsed, UTC)

    def now(self) -> datetime:
        return max(self._system_now(), self.floor())

    def _raise_floor(self, when: datetime) -> None:
        current = self.floor()
        if when <= current:
            return
        self._boot_floor = when.timestamp()
        self._boot_mono = self._monotonic()
        self._persist()

    def observe_timestamp(self, expires: datetime) -> None:
        """A verified timestamp expiring at ``expires`` proves the time is past ``expires - lifetime``."""
        self._raise_floor(expires - self._lifetime)

    def checkpoint(self) -> None:
        """Persist the current lower bound (call periodically and at shutdown)."""
        floor = self.floor()
        self._boot_floor = floor.timestamp()
        self._boot_mono = self._monotonic()
        self._persist()
