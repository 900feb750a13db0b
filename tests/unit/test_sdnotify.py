"""sd_notify over ``NOTIFY_SOCKET`` (``fleet_protocol.io.sdnotify``), against a test listener."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fleet_protocol.io.sdnotify import MAX_STATUS, Notifier, watchdog_interval_s
from tests.notify_listener import NotifyListener


def test_ready_status_watchdog_and_stopping_arrive_as_systemd_reads_them(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify")
    try:
        n = Notifier(listener.env)
        assert n.enabled
        assert n.ready("up; 3 stages")
        assert n.watchdog() and n.status("line one\nline two") and n.stopping()
        assert listener.wait_for("READY", "1") == {"READY": "1", "STATUS": "up; 3 stages"}
        listener.wait_for("STOPPING", "1")
        assert listener.pings() == 1
        assert listener.statuses()[-1] == "line one line two"  # one line, never two fields
        n.close()
    finally:
        listener.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and n.sent == 0


def test_an_abstract_socket_address_is_used_as_such() -> None:
    name = f"sovereign-edge-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        server.settimeout(5)
        assert server.recv(100) == b"WATCHDOG=1"
    finally:
        server.close()


def test_a_vanished_socket_is_counted_and_never_raises(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.watchdog()
    assert n.failed == 1


def test_a_long_status_is_capped_to_fit_one_datagram(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify")
    try:
        Notifier(listener.env).status("x" * 10_000)
        assert len(listener.wait_for("STATUS")["STATUS"]) == MAX_STATUS
    finally:
        listener.close()


def test_watchdog_interval_is_half_the_period_and_only_for_this_process() -> None:
    me = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({}) is None
