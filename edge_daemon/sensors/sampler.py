"""Sampling sysfs sensors on a schedule, and turning readings into telemetry.

Owns the sampling thread and the hand-off of each ``Telemetry`` to a publish callback
and the ``TelemetryStore``. Invariants: one sample per ``period_s`` (the thread waits on
the shared stop event, so it stops within one wait); a sample with no readings (every
sensor missing) is not published; a publish or store failure is logged and counted, and
never ends the thread; the store gets every message, marked with whether it went out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from edge_daemon.errors import EdgeError
from edge_daemon.sensors.store import TelemetryStore
from edge_daemon.sensors.sysfs import SensorPlugin
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.telemetry import Reading, Telemetry

log = logging.getLogger(__name__)
Publish = Callable[[Telemetry], bool]


class TelemetrySink:
    """Publishes a telemetry message and keeps it in the store; thread-safe."""

    def __init__(self, device: str, publish: Publish, store: TelemetryStore | None) -> None:
        self.device, self._publish, self._store = device, publish, store
        self._lock = threading.Lock()
        self.sent = self.failed = 0

    def emit(self, readings: Sequence[Reading], period_ms: int) -> Telemetry | None:
        if not readings:
            return None
        t = Telemetry(
            device=self.device,
            time_ms=int(time.time() * 1000),
            period_ms=period_ms,
            readings=tuple(readings),
        )
        try:
            ok = self._publish(t)
        except Exception as e:
            log.warning("telemetry publish failed: %s", e)
            ok = False
        with self._lock:
            if ok:
                self.sent += 1
            else:
                self.failed += 1
        if self._store is not None:
            try:
                self._store.add(t, published=ok)
            except EdgeError as e:
                log.error("%s", e)
        return t


class SensorSampler:
    def __init__(
        self,
        sensors: Sequence[SensorPlugin],
        sink: TelemetrySink,
        period_s: float,
        faults: LoopFaults | None = None,
    ):
        self.sensors, self.sink, self.period_s = list(sensors), sink, period_s
        self.faults = faults if faults is not None else LoopFaults()
        self.samples = 0
        self._thread: threading.Thread | None = None

    def sample_once(self) -> Telemetry | None:
        readings: list[Reading] = []
        for s in self.sensors:
            try:
                readings += s.read()
            except Exception:
                log.exception("sensor %s failed", s.name)
        self.samples += 1
        return self.sink.emit(readings, int(self.period_s * 1000))

    def start(self, stop: threading.Event) -> None:
        def loop() -> None:
            while not stop.is_set():
                with self.faults.guard("sensors"):  # the store, the sink: never the thread
                    self.sample_once()
                stop.wait(self.period_s)

        self._thread = threading.Thread(target=loop, name="sensors", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def errors(self) -> int:
        return sum(s.errors for s in self.sensors)
