"""Telemetry: privacy-safe measurements a device publishes beside its events.

Topic ``fleet/v1/<device>/telemetry`` (``topics.telemetry``). One JSON object, sorted
keys, no whitespace::

    {"device": "pi-007", "period_ms": 1000,
     "readings": [{"quantity": "laeq", "sensor": "mic", "unit": "dB(A)", "value": 57.31}],
     "time_ms": 1764000000000}

- ``time_ms``: end of the measured period, Unix epoch milliseconds;
- ``period_ms``: the period the readings cover (1000 for LAeq,1s; the sampling period
  for sysfs sensors);
- ``readings``: 1 to ``MAX_READINGS``; ``sensor`` is the configured sensor name (``mic``
  for the sound level), ``quantity`` one of a fixed vocabulary with an optional
  ``_x``/``_y``/``_z`` or channel-number suffix (``temperature``, ``relative_humidity``,
  ``pressure``, ``acceleration_x``, ``laeq`` ...), ``unit`` its SI-ish unit (``degC``,
  ``%``, ``hPa``, ``m/s2``, ``dB(A)``), ``value`` a finite number.

Sans-IO: ``Telemetry`` is a ``DeviceMessage`` (fleet_protocol/wire.py); ``from_bytes``
takes at most ``MAX_TELEMETRY_BYTES`` and raises only ``ProtocolError`` subclasses. No
audio, ever: a reading is one number.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar

from pydantic import ConfigDict, Field

from fleet_protocol import topics
from fleet_protocol.wire import DeviceMessage, UInt63, WireModel

MAX_TELEMETRY_BYTES = 32 * 1024
MAX_READINGS = 128
NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
QUANTITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9%/()._-]{1,16}$")


class Reading(WireModel):
    """One measured number of one sensor."""

    ABSTRACT: ClassVar[bool] = True  # part of Telemetry, never sent alone

    sensor: Annotated[str, Field(max_length=32, pattern=NAME_RE.pattern)]
    quantity: Annotated[str, Field(max_length=48, pattern=QUANTITY_RE.pattern)]
    unit: Annotated[str, Field(max_length=16, pattern=UNIT_RE.pattern)]
    value: Annotated[float, Field(description="a finite number")]


class Telemetry(DeviceMessage):
    """Sound level and sysfs sensor readings of one period, published on
    ``fleet/v1/<device>/telemetry``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device": "pi-007",
                    "period_ms": 1000,
                    "readings": [
                        {"quantity": "laeq", "sensor": "mic", "unit": "dB(A)", "value": 57.31},
                        {"quantity": "temperature", "sensor": "soc", "unit": "degC", "value": 48.3},
                    ],
                    "time_ms": 1764000000000,
                }
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = MAX_TELEMETRY_BYTES
    TOPIC_KIND: ClassVar[str] = topics.TELEMETRY

    time_ms: Annotated[UInt63, Field(description="end of the measured period, Unix ms")]
    period_ms: Annotated[UInt63, Field(description="the period the readings cover, ms")]
    readings: Annotated[tuple[Reading, ...], Field(min_length=1, max_length=MAX_READINGS)]


__all__ = ["MAX_READINGS", "MAX_TELEMETRY_BYTES", "Reading", "Telemetry"]
