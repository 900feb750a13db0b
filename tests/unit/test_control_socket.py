"""The daemon's control socket (``edge_daemon.control``): one request line, one JSON reply."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from edge_daemon.control import MAX_REQUEST, ControlServer, query
from edge_daemon.errors import EdgeError


def _raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        return s.recv(65536)


def test_status_is_answered_and_the_socket_is_group_readable_only(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("stale socket file from a killed daemon")
    server = ControlServer(path, lambda: {"state": "listening"}).start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert query(path) == {"state": "listening"}
        assert b"unknown request" in _raw(path, b"reboot\n")
        assert b"too long" in _raw(path, b"x" * (MAX_REQUEST + 10))
    finally:
        server.close()


def test_a_failing_status_is_answered_as_an_error_and_the_server_goes_on(tmp_path: Path) -> None:
    calls: list[int] = []

    def status() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"ok": True}

    path = tmp_path / "c.sock"
    server = ControlServer(path, status).start()
    try:
        assert query(path) == {"error": "status failed: RuntimeError"}
        assert query(path) == {"ok": True}
    finally:
        server.close()


def test_query_names_the_socket_when_no_daemon_listens(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="is it running"):
        query(tmp_path / "nobody.sock")
