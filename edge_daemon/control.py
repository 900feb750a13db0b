"""The daemon's local control socket: ``edge-daemon status`` asks, the running daemon answers.

Owns ``ControlServer`` (a Unix stream socket served by one thread) and ``query`` (the
client). The protocol is one request line (``status``) and one JSON document in reply,
then the server closes the connection.

Invariants: the socket is created with mode 0660 (owner and group: the operator joins the
service's group to read it) and a stale socket file left by a killed daemon is replaced;
a request is read with a byte cap (``MAX_REQUEST``) and a timeout, so a slow or hostile
client never holds the thread; an unknown request gets ``{"error": ...}``, never a
traceback; the answer is produced by a callback the daemon supplies, and an exception
there is answered as an error and logged, never kills the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_daemon.errors import EdgeError

log = logging.getLogger(__name__)

MAX_REQUEST = 256
MAX_REPLY = 1024 * 1024
TIMEOUT_S = 2.0


class ControlServer:
    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._status = status
        self._stop = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket file left by a daemon that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))  # as strict as the process umask (0077 under systemd)
        os.chmod(path, 0o660)  # then owner and group; never the umask: it is process-wide
        self._sock.listen(4)
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        log.info("control socket %s", self.path)
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except OSError as e:
                    log.debug("control client went away: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT_S)
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                break
            data += chunk
        request = data.split(b"\n", 1)[0].strip()
        reply: dict[str, Any]
        if len(data) > MAX_REQUEST:
            reply = {"error": "request too long"}
        elif request == b"status":
            try:
                reply = self._status()
            except Exception as e:
                log.exception("control: status failed")
                reply = {"error": f"status failed: {type(e).__name__}"}
        else:
            reply = {"error": f"unknown request {request[:40]!r}; ask 'status'"}
        conn.sendall(json.dumps(reply, default=str).encode() + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query(path: Path, request: str = "status", timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask the daemon at ``path``; raises ``EdgeError`` when it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
            s.sendall(request.encode() + b"\n")
            data = b""
            while len(data) <= MAX_REPLY:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise EdgeError(
                f"{path}: cannot reach the daemon ({e.strerror or e}); is it running?"
            ) from e
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise EdgeError(f"{path}: the daemon's answer is not JSON") from e
    if not isinstance(reply, dict):
        raise EdgeError(f"{path}: unexpected answer")
    return reply
