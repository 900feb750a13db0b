"""The daemon as a systemd service: readiness, watchdog, STATUS, metrics, control socket.

Owns ``Supervision``, which the composition root starts once every component is up and
ticks on every main-loop turn. Start: the control socket (``edge-daemon status``), the
metrics endpoint (when ``service.metrics_port`` is set), then ``READY=1``. Each tick:
ask ``health.StageMonitor`` which stages stalled; when none did, send ``WATCHDOG=1``
(at most every half ``WatchdogSec=``); every ``report_s`` refresh the metrics from the
daemon's status and send a one-line ``STATUS=``. Close: ``STOPPING=1``, then the servers.

Invariants: a stalled stage stops the pings and says which stage in STATUS, so systemd
kills and restarts the daemon once ``WatchdogSec=`` passes (``Restart=on-failure``); the
pings resume by themselves if the stage recovers in time. Nothing here raises into the
main loop: a control socket that cannot be bound is logged and skipped (the daemon
still runs), a metrics port in use is a configuration error raised at start.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_daemon.config import DeviceConfig
from edge_daemon.control import ControlServer
from edge_daemon.errors import ConfigError
from edge_daemon.health import Stage, StageMonitor
from edge_daemon.metrics import EdgeMetrics
from fleet_protocol.io.metrics import MetricsServer
from fleet_protocol.io.sdnotify import Notifier, watchdog_interval_s

log = logging.getLogger(__name__)


def version() -> str:
    try:
        return importlib.metadata.version("sovereign-edge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def control_socket_path(cfg: DeviceConfig, env: Mapping[str, str] | None = None) -> Path:
    """The configured socket, else ``$RUNTIME_DIRECTORY/control.sock``, else state_dir's."""
    env = os.environ if env is None else env
    if cfg.service.control_socket is not None:
        return cfg.service.control_socket
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return (Path(runtime) if runtime else cfg.state_dir) / "control.sock"


class Supervision:
    def __init__(
        self,
        cfg: DeviceConfig,
        *,
        stages: list[Stage],
        status: Callable[[], dict[str, Any]],
        metrics: EdgeMetrics,
        env: Mapping[str, str] | None = None,
        report_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._env = os.environ if env is None else env
        self._status = status
        self._stage_names = [s.name for s in stages]
        self.monitor = StageMonitor(stages, cfg.service.stall_s, clock)
        self.metrics = metrics
        self.notifier = Notifier(self._env)
        self.ping_s = watchdog_interval_s(self._env)
        self._report_s = report_s
        self._clock = clock
        self._last_ping = -1e18
        self._last_report = -1e18
        self.stalled: list[str] = []
        self.pings = 0
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None

    def start(self) -> None:
        path = control_socket_path(self.cfg, self._env)
        try:
            self.control = ControlServer(path, self.state).start()
        except OSError as e:
            log.warning("control socket %s not available (%s); `status` will not answer", path, e)
        port = self.cfg.service.metrics_port
        if port is not None:
            try:
                server = MetricsServer(self.metrics.metrics, self.cfg.service.metrics_host, port)
            except OSError as e:
                raise ConfigError(f"service.metrics_port {port}: cannot listen ({e})") from e
            self.metrics_server = server.start()
        self._refresh()
        self.notifier.ready(self._status_line())

    def state(self) -> dict[str, Any]:
        """What ``edge-daemon status`` prints: the daemon's status plus the service view."""
        out = self._status()
        out["version"] = self.metrics.version
        out["health"] = {"stalled": list(self.stalled), "watchdog_pings": self.pings}
        return out

    def tick(self) -> None:
        now = self._clock()
        self.stalled = self.monitor.stalled()
        self.metrics.health(self.stalled, self._stage_names)
        if self.stalled:
            if now - self._last_report >= self._report_s:
                log.error("stalled stage(s): %s; watchdog pings withheld", ", ".join(self.stalled))
        elif self.ping_s is not None and now - self._last_ping >= self.ping_s:
            if self.notifier.watchdog():
                self.pings += 1
            self._last_ping = now
        if now - self._last_report >= self._report_s:
            self._last_report = now
            self._refresh()
            self.notifier.status(self._status_line())

    def _refresh(self) -> None:
        try:
            self.metrics.update(self._status())
        except Exception:
            log.exception("metrics: could not read the daemon's status")

    def _status_line(self) -> str:
        if self.stalled:
            return f"STALLED: {', '.join(self.stalled)}"
        try:
            st = self._status()
        except Exception:
            return "running"
        stream, uplink = st["stream"], st["uplink"]
        return (
            f"{st['state']}; windows {stream['windows_in']} in, {stream['windows_kept']} kept; "
            f"batches {uplink['batches_sealed']} sealed, {uplink['acks']} acked; "
            f"adapter v{st['model']['adapter_version']}"
        )

    def close(self) -> None:
        self.notifier.stopping()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.control is not None:
            self.control.close()
        self.notifier.close()
