"""A stand-in for systemd's side of ``NOTIFY_SOCKET``: receives and records sd_notify messages.

Used by the unit tests of ``fleet_protocol.io.sdnotify`` and by the supervision tests,
which also play systemd's watchdog: ``last_ping_age`` says how long ago ``WATCHDOG=1``
arrived, as systemd measures it against ``WatchdogSec=``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self.ping_times: list[float] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append(fields)
                if fields.get("WATCHDOG") == "1":
                    self.ping_times.append(time.monotonic())
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        """The first message (from the start) carrying ``key`` (= ``value``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if key in m and (value is None or m[key] == value):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} in {self.messages[-5:]}")
                self._cond.wait(left)

    def last_ping_age(self) -> float:
        with self._cond:
            return time.monotonic() - self.ping_times[-1] if self.ping_times else float("inf")

    def pings(self) -> int:
        with self._cond:
            return len(self.ping_times)

    def statuses(self) -> list[str]:
        with self._cond:
            return [m["STATUS"] for m in self.messages if "STATUS" in m]

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)
