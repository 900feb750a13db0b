"""Child processes that devstack starts, and the loopback ports they listen on.

Invariants:
- every process started through a ``ProcessGroup`` is recorded with its PID and is
  stopped by that PID (SIGTERM, then SIGKILL after a grace period) when the group
  closes, in reverse start order, also on exceptions and Ctrl-C;
- each child runs in its own session, so a Ctrl-C at the terminal reaches only us
  and we decide the stop order;
- child output goes to a log file per process, never to our stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from devstack.errors import ComponentStartError, ToolMissingError

log = logging.getLogger(__name__)


def require_tool(name: str) -> str:
    """Return the absolute path of executable ``name`` or raise ``ToolMissingError``."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise ToolMissingError(name)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port P such that P and P+1 were both free (swtpm wants server and control ports)."""
    for _ in range(200):
        p = free_port()
        if p < 65535 and port_is_free(p + 1):
            return p
    raise ComponentStartError("port allocator", "no two adjacent free loopback ports")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class ProcessGroup:
    """Starts children, remembers their PIDs, stops them all in reverse order."""

    def __init__(self, log_dir: Path, grace_seconds: float = 5.0) -> None:
        self.log_dir = log_dir
        self.grace_seconds = grace_seconds
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        log.debug("started %s pid=%s: %s", name, popen.pid, " ".join(argv))
        return child

    def stop(self, child: Child) -> int | None:
        """Stop one child by PID: SIGTERM, wait, SIGKILL. Returns its exit code."""
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            try:
                child.popen.wait(self.grace_seconds)
            except subprocess.TimeoutExpired:
                log.warning("%s pid=%s ignored SIGTERM; killing", child.name, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.popen.wait(self.grace_seconds)
        if child in self.children:
            self.children.remove(child)
        return child.popen.returncode

    def close(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
