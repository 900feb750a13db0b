"""systemd's service notification protocol (sd_notify), for both services' ``Type=notify``.

Owns ``Notifier``: one datagram per call to the socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace), each a newline-separated list of
``KEY=value`` assignments: ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``.
``watchdog_interval_s`` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, which must be
this process when set) and returns how often to ping: half the watchdog period, as
sd_watchdog_enabled(3) advises.

Invariants: without ``$NOTIFY_SOCKET`` every call is a no-op (the services run the same
outside systemd); a send never raises or blocks the caller (a full or vanished socket is
logged once at debug and counted in ``failed``); a STATUS text is one line, capped at
``MAX_STATUS`` bytes, so a message always fits one datagram.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

MAX_STATUS = 512


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock addresses (vsock:CID:PORT) are not used on our hosts


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec=``), or None when off."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. our parent)
    return int(usec) / 1e6 / 2


class Notifier:
    """Sends sd_notify messages; a no-op when the service does not run under notify."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased); True when the datagram went out."""
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            if key.upper() == "STATUS":
                text = text.encode()[:MAX_STATUS].decode(errors="ignore")
            lines.append(f"{key.upper()}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if self.failed == 0:
                log.debug("sd_notify to %r failed: %s", self.address, e)
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
