"""The daemon's sensors in one object: LAeq on the audio stream, sysfs sampling, the store.

Owns the wiring ``app.py`` needs, so the composition root adds only a few lines:
``DeviceSensors(cfg, publish, link_up, republish)`` → ``start()`` → ``tap(blocks)`` on the
audio path → ``close()``. Invariants: LAeq is taken from *all* audio (before the privacy
gate: it is a level, and only the level leaves); the sampling and resend threads stop
with ``close()``, before the store closes; the telemetry table lives in the replay
buffer's file; given ``link_up``, what an outage held back is re-published when the link
is up again (``resend.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon.config import DeviceConfig
from edge_daemon.sensors.laeq import LaeqMeter, tap
from edge_daemon.sensors.resend import TelemetryResender
from edge_daemon.sensors.sampler import SensorSampler, TelemetrySink
from edge_daemon.sensors.store import TelemetryStore
from edge_daemon.sensors.sysfs import make_sensor
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.telemetry import Reading, Telemetry

log = logging.getLogger(__name__)
MIC_SENSOR = "mic"


class DeviceSensors:
    def __init__(
        self,
        cfg: DeviceConfig,
        publish: Callable[[Telemetry], bool],
        link_up: Callable[[], bool] | None = None,
        republish: Callable[[Telemetry], bool] | None = None,
        faults: LoopFaults | None = None,
    ) -> None:
        """``publish``: live telemetry; ``link_up``: whether the uplink is connected (None:
        nothing is resent); ``republish``: how held-back telemetry is resent (default
        ``publish``; the app waits for the broker's acknowledgement there)."""
        s = cfg.sensors
        self.cfg = s
        self.store = TelemetryStore(cfg.state_dir / "buffer.sqlite3", s.max_rows)
        self.sink = TelemetrySink(cfg.device_id, publish, self.store)
        self.sampler = SensorSampler(
            [make_sensor(c, s.sysfs_root) for c in s.sources], self.sink, s.period_s, faults
        )
        self.resender = (
            None
            if link_up is None
            else TelemetryResender(
                cfg.device_id, self.store, republish or publish, link_up, faults=faults
            )
        )
        self._stop = threading.Event()
        self.last_laeq: float | None = None

    def start(self) -> None:
        if self.sampler.sensors:
            self.sampler.start(self._stop)
        if self.resender is not None:
            self.resender.start(self._stop)

    def tap(self, blocks: Iterable[npt.NDArray[np.float32]]) -> Iterator[npt.NDArray[np.float32]]:
        if not self.cfg.laeq.enabled:
            return iter(blocks)
        return tap(blocks, LaeqMeter(self.cfg.laeq.calibration_db), self._on_level)

    def _on_level(self, level: float) -> None:
        self.last_laeq = level
        self.sink.emit(
            [Reading(sensor=MIC_SENSOR, quantity="laeq", unit="dB(A)", value=level)], 1000
        )

    def report(self) -> dict[str, Any]:
        return {
            "telemetry_sent": self.sink.sent,
            "telemetry_unsent": self.sink.failed,
            "telemetry_resent": self.resender.resent if self.resender is not None else 0,
            "telemetry_unpublished_rows": self.store.unpublished_count(),
            "sensor_samples": self.sampler.samples,
            "sensor_errors": self.sampler.errors(),
            "last_laeq_db": self.last_laeq,
        }

    def close(self) -> None:
        self._stop.set()
        self.sampler.join()
        if self.resender is not None:
            self.resender.join()
        self.store.close()
