"""Telemetry: privacy-safe measurements a device publishes beside its events.

Topic ``fleet/v1/<device>/telemetry`` (``topics.telemetry``). One JSON object, sorted
keys, no whitespace::

    {"device": "pi-007", "time_ms": 1764000000000, "period_ms": 1000,
     "readings": [{"sensor": "mic", "quantity": "laeq", "unit": "dB(A)", "value": 57.31}]}

- ``time_ms``: end of the measured period, Unix epoch milliseconds;
- ``period_ms``: the period the readings cover (1000 for LAeq,1s; the sampling period
  for sysfs sensors);
- ``readings``: 1 to ``MAX_READINGS``; ``sensor`` is the configured sensor name (``mic``
  for the sound level), ``quantity`` one of a fixed vocabulary with an optional
  ``_x``/``_y``/``_z`` or channel-number suffix (``temperature``, ``relative_humidity``,
  ``pressure``, ``acceleration_x``, ``laeq`` ...), ``unit`` its SI-ish unit (``degC``,
  ``%``, ``hPa``, ``m/s2``, ``dB(A)``), ``value`` a finite number.

Sans-IO: ``from_bytes`` takes at most ``MAX_TELEMETRY_BYTES`` and raises only
``ProtocolError`` subclasses. No audio, ever: a reading is one number.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Self

from fleet_protocol.errors import MalformedError, TooLargeError
from fleet_protocol.topics import check_device_id

MAX_TELEMETRY_BYTES = 32 * 1024
MAX_READINGS = 128
NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
QUANTITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9%/()._-]{1,16}$")


@dataclass(frozen=True)
class Reading:
    sensor: str
    quantity: str
    unit: str
    value: float

    def check(self) -> Self:
        if not NAME_RE.fullmatch(self.sensor) or not QUANTITY_RE.fullmatch(self.quantity):
            raise MalformedError("telemetry reading has a bad sensor or quantity name")
        if not UNIT_RE.fullmatch(self.unit):
            raise MalformedError("telemetry reading has a bad unit")
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise MalformedError("telemetry value is not a number")
        try:
            finite = math.isfinite(self.value)
        except OverflowError:  # an integer beyond float range
            finite = False
        if not finite:
            raise MalformedError("telemetry value is not finite")
        return self


@dataclass(frozen=True)
class Telemetry:
    device: str
    time_ms: int
    period_ms: int
    readings: tuple[Reading, ...]

    def to_bytes(self) -> bytes:
        obj = {
            "device": self.device,
            "time_ms": self.time_ms,
            "period_ms": self.period_ms,
            "readings": [
                {"sensor": r.sensor, "quantity": r.quantity, "unit": r.unit, "value": r.value}
                for r in self.readings
            ],
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if len(data) > MAX_TELEMETRY_BYTES:
            raise TooLargeError(f"telemetry of {len(data)} bytes exceeds {MAX_TELEMETRY_BYTES}")
        try:
            o: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise MalformedError(f"telemetry is not JSON: {e}") from e
        if not isinstance(o, dict) or set(o) != {"device", "time_ms", "period_ms", "readings"}:
            raise MalformedError("telemetry must have exactly device, time_ms, period_ms, readings")
        if not isinstance(o["device"], str):
            raise MalformedError("telemetry device is not a string")
        check_device_id(o["device"])
        for k in ("time_ms", "period_ms"):
            if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 0:
                raise MalformedError(f"telemetry {k} is not a non-negative integer")
        rs = o["readings"]
        if not isinstance(rs, list) or not 1 <= len(rs) <= MAX_READINGS:
            raise MalformedError(f"telemetry needs 1 to {MAX_READINGS} readings")
        readings = []
        for r in rs:
            if not isinstance(r, dict) or set(r) != {"sensor", "quantity", "unit", "value"}:
                raise MalformedError("telemetry reading must have sensor, quantity, unit, value")
            if not all(isinstance(r[k], str) for k in ("sensor", "quantity", "unit")):
                raise MalformedError("telemetry reading names must be strings")
            readings.append(Reading(r["sensor"], r["quantity"], r["unit"], r["value"]).check())
        return cls(o["device"], o["time_ms"], o["period_ms"], tuple(readings))
