"""Sensor plugins that read Linux IIO and hwmon attributes from sysfs.

Owns the mapping from sysfs attributes to telemetry readings (quantity, SI-ish unit).

- IIO (``<root>/bus/iio/devices/iio:deviceN``, Documentation/ABI/testing/sysfs-bus-iio):
  ``in_<chan>_input`` is already processed; otherwise ``(in_<chan>_raw + offset) * scale``
  with ``in_<chan>_scale``/``_offset`` or the shared ``in_<type>_scale``/``_offset``.
  ABI units: temp milli-degC, humidityrelative milli-percent, pressure kPa, accel m/s^2,
  anglvel rad/s, illuminance lux, voltage mV; converted here to degC, %, hPa, m/s2,
  rad/s, lx, V.
- hwmon (``<root>/class/hwmon/hwmonN``, Documentation/hwmon/sysfs-interface):
  ``temp<N>_input`` milli-degC, ``humidity<N>_input`` milli-percent, ``in<N>_input`` mV,
  ``fan<N>_input`` RPM, ``curr<N>_input`` mA, ``power<N>_input`` uW.

Invariants: a device is found by its ``name`` attribute or its directory name; every
read is capped at ``MAX_ATTR_BYTES``; a device or attribute that is missing or
unreadable is logged (rate-limited) and counted in ``errors``, and the other readings
still go out: a flaky I2C sensor never stops sampling. ``root`` is ``/sys`` on a device
and a fake tree in tests.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Protocol

from edge_daemon.config import HwmonSensorConfig, IioSensorConfig, SensorSourceConfig
from fleet_protocol.telemetry import Reading

log = logging.getLogger(__name__)
MAX_ATTR_BYTES = 64
LOG_EVERY_S = 300.0

# IIO channel type → (quantity, unit, factor from the ABI unit)
IIO_TYPES: dict[str, tuple[str, str, float]] = {
    "temp": ("temperature", "degC", 1e-3),
    "humidityrelative": ("relative_humidity", "%", 1e-3),
    "pressure": ("pressure", "hPa", 10.0),
    "accel": ("acceleration", "m/s2", 1.0),
    "anglvel": ("angular_velocity", "rad/s", 1.0),
    "illuminance": ("illuminance", "lx", 1.0),
    "voltage": ("voltage", "V", 1e-3),
}
HWMON_TYPES: dict[str, tuple[str, str, float]] = {
    "temp": ("temperature", "degC", 1e-3),
    "humidity": ("relative_humidity", "%", 1e-3),
    "in": ("voltage", "V", 1e-3),
    "fan": ("fan_speed", "rpm", 1.0),
    "curr": ("current", "A", 1e-3),
    "power": ("power", "W", 1e-6),
}
IIO_CHAN_RE = re.compile(r"^in_([a-z]+?)(\d*)(?:_([xyz]))?_(input|raw)$")
HWMON_CHAN_RE = re.compile(r"^([a-z]+)(\d+)_input$")


class SensorPlugin(Protocol):
    name: str
    errors: int

    def read(self) -> list[Reading]: ...


def read_number(path: Path) -> float:
    """One numeric sysfs attribute; ``OSError``/``ValueError`` if absent or not a number."""
    with open(path, "rb") as f:
        raw = f.read(MAX_ATTR_BYTES + 1)
    if len(raw) > MAX_ATTR_BYTES:
        raise ValueError(f"{path}: more than {MAX_ATTR_BYTES} bytes")
    return float(raw.decode("ascii").strip())


def _find(base: Path, prefix: str, wanted: str) -> Path | None:
    if not base.is_dir():
        return None
    for d in sorted(base.iterdir()):
        if not d.name.startswith(prefix):
            continue
        if d.name == wanted:
            return d
        try:
            with open(d / "name", "rb") as f:
                if f.read(MAX_ATTR_BYTES).decode("ascii", "replace").strip() == wanted:
                    return d
        except OSError:
            continue
    return None


class _SysfsSensor:
    kind = ""

    def __init__(self, name: str, base: Path, prefix: str, wanted: str, channels: tuple[str, ...]):
        self.name = name
        self.errors = 0
        self._base, self._prefix, self._wanted, self._channels = base, prefix, wanted, channels
        self._last_log: dict[str, float] = {}

    def _complain(self, key: str, msg: str, *args: object) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[key] = now
            log.error(msg, *args)

    def read(self) -> list[Reading]:
        d = _find(self._base, self._prefix, self._wanted)
        if d is None:
            present = (
                sorted(p.name for p in self._base.iterdir() if p.name.startswith(self._prefix))
                if self._base.is_dir()
                else []
            )
            self._complain(
                "device",
                "sensor %s: %s device %r not found under %s (present: %s); check sensors.sources",
                self.name,
                self.kind,
                self._wanted,
                self._base,
                ", ".join(present) or "none",
            )
            return []
        out: list[Reading] = []
        for chan, reading in self._channels_of(d):
            try:
                value = reading()
            except (OSError, ValueError) as e:
                self._complain(chan, "sensor %s: cannot read %s in %s: %s", self.name, chan, d, e)
                continue
            out.append(value)
        return out

    def _channels_of(self, d: Path) -> list[tuple[str, _Reader]]:
        raise NotImplementedError


class _Reader(Protocol):
    def __call__(self) -> Reading: ...


class IioSensor(_SysfsSensor):
    kind = "IIO"

    def __init__(self, cfg: IioSensorConfig, root: Path) -> None:
        super().__init__(cfg.name, root / "bus/iio/devices", "iio:device", cfg.device, cfg.channels)

    def _channels_of(self, d: Path) -> list[tuple[str, _Reader]]:
        found: dict[str, tuple[str, str, str, str]] = {}  # chan → (type, index, axis, how)
        for f in sorted(p.name for p in d.iterdir()):
            m = IIO_CHAN_RE.fullmatch(f)
            if m is None or m.group(1) not in IIO_TYPES:
                continue
            typ, idx, axis, how = m.group(1), m.group(2), m.group(3) or "", m.group(4)
            chan = typ + idx + (f"_{axis}" if axis else "")
            if chan not in found or how == "input":  # prefer the processed value
                found[chan] = (typ, idx, axis, how)
        wanted = self._channels or tuple(found)
        out: list[tuple[str, _Reader]] = []
        for chan in wanted:
            if chan not in found:
                self._complain(chan, "sensor %s: IIO channel %s not in %s", self.name, chan, d)
                continue
            out.append((chan, self._reader(d, chan, *found[chan])))
        return out

    def _reader(self, d: Path, chan: str, typ: str, idx: str, axis: str, how: str) -> _Reader:
        quantity, unit, factor = IIO_TYPES[typ]
        quantity += idx + (f"_{axis}" if axis else "")

        def attr(suffix: str, default: float) -> float:
            for name in (f"in_{chan}_{suffix}", f"in_{typ}{idx}_{suffix}", f"in_{typ}_{suffix}"):
                if (d / name).exists():
                    return read_number(d / name)
            return default

        def read() -> Reading:
            if how == "input":
                v = read_number(d / f"in_{chan}_input")
            else:
                v = (read_number(d / f"in_{chan}_raw") + attr("offset", 0.0)) * attr("scale", 1.0)
            return Reading(
                sensor=self.name, quantity=quantity, unit=unit, value=round(v * factor, 6)
            )

        return read


class HwmonSensor(_SysfsSensor):
    kind = "hwmon"

    def __init__(self, cfg: HwmonSensorConfig, root: Path) -> None:
        super().__init__(cfg.name, root / "class/hwmon", "hwmon", cfg.chip, cfg.channels)

    def _channels_of(self, d: Path) -> list[tuple[str, _Reader]]:
        found: dict[str, tuple[str, str]] = {}
        for f in sorted(p.name for p in d.iterdir()):
            m = HWMON_CHAN_RE.fullmatch(f)
            if m is not None and m.group(1) in HWMON_TYPES:
                found[m.group(1) + m.group(2)] = (m.group(1), m.group(2))
        wanted = self._channels or tuple(found)
        out: list[tuple[str, _Reader]] = []
        for chan in wanted:
            if chan not in found:
                self._complain(chan, "sensor %s: hwmon channel %s not in %s", self.name, chan, d)
                continue
            typ, idx = found[chan]
            quantity, unit, factor = HWMON_TYPES[typ]

            def read(
                chan: str = chan, q: str = quantity + idx, u: str = unit, k: float = factor
            ) -> Reading:
                value = round(read_number(d / f"{chan}_input") * k, 6)
                return Reading(sensor=self.name, quantity=q, unit=u, value=value)

            out.append((chan, read))
        return out


def make_sensor(cfg: SensorSourceConfig, root: Path) -> SensorPlugin:
    if isinstance(cfg, IioSensorConfig):
        return IioSensor(cfg, root)
    return HwmonSensor(cfg, root)
