"""The OTA client's clock on a Pi without a real-time clock: a lower bound that never goes back.

Owns ``<state>/ota/clock.json`` (``{"floor": <unix seconds>}``). A Pi 5 without its RTC
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

Invariants: the persisted floor never decreases; it is written temp → fsync → rename.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)


class TrustedClock:
    def __init__(
        self,
        path: Path,
        *,
        timestamp_lifetime: timedelta,
        system_now: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._lifetime = timestamp_lifetime
        self._system_now = system_now
        self._monotonic = monotonic
        self._boot_floor = self._load()
        self._boot_mono = monotonic()

    def _load(self) -> float:
        try:
            return float(json.loads(self.path.read_bytes())["floor"])
        except FileNotFoundError:
            return 0.0
        except (ValueError, KeyError, TypeError) as e:
            log.warning("OTA clock floor unreadable (%s); starting from 0", e)
            return 0.0

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
        write_atomic(self.path, json.dumps({"floor": self._boot_floor}).encode())

    def observe_timestamp(self, expires: datetime) -> None:
        """A verified timestamp expiring at ``expires`` proves the time is past ``expires - lifetime``."""
        self._raise_floor(expires - self._lifetime)

    def checkpoint(self) -> None:
        """Persist the current lower bound (call periodically and at shutdown)."""
        floor = self.floor()
        self._boot_floor = floor.timestamp()
        self._boot_mono = self._monotonic()
        write_atomic(self.path, json.dumps({"floor": self._boot_floor}).encode())
