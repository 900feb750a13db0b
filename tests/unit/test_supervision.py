"""Stage monitor and supervision: WATCHDOG=1 only while every stage progresses (fake clock).

The same with a real listener, gate and a stalling audio source is
tests/integration/test_service_watchdog.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge_daemon.config import DeviceConfig
from edge_daemon.control import query
from edge_daemon.health import Stage, StageMonitor
from edge_daemon.metrics import EdgeMetrics
from edge_daemon.supervise import Supervision, control_socket_path
from tests.notify_listener import NotifyListener


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _cfg(tmp_path: Path, **service: Any) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "device_id": "pi-00",
            "state_dir": str(tmp_path / "state"),
            "broker": {"host": "h", "ca_cert": "/c", "client_cert": "/c", "client_key": "/k"},
            "tpm": {"tcti": "device:/dev/tpmrm0"},
            "cloud": {"unwrap_public_key": "/u.pem", "ota_public_key": "/o.pem"},
            "model": {"base_fp32": "/a.onnx", "base_int8": "/b.onnx"},
            "source": {"type": "live", "device": "mic"},
            "service": {"stall_s": 30, **service},
        }
    )


def _status() -> dict[str, Any]:
    return {
        "device_id": "pi-00",
        "state": "listening",
        "model": {"sha256": "ab" * 32, "adapter_version": 2, "path": "/m"},
        "stream": {"blocks": 5, "windows_in": 4, "windows_kept": 3, "raw_audio_bytes": 64000},
        "events": 1,
        "inferences": {"siren": 2, "dog": 1},
        "buffer": {"samples": 7, "batches": 3, "batches_acked": 1},
        "buffer_pending_bytes": 4096,
        "uplink": {"batches_sealed": 3, "sends": 3, "resends": 1, "acks": 1, "uplink_bytes": 9},
        "mailbox_dropped": 0,
        "loop_errors": 0,
        "ota": {"state": "applied", "channel": "stable"},
    }


def test_a_stage_stalls_only_when_work_is_expected_and_its_counter_stood_still() -> None:
    clock, n, busy = Clock(), [0], [True]
    mon = StageMonitor([Stage("capture", lambda: n[0], lambda: busy[0])], 30, clock)
    assert mon.stalled() == []
    clock.t += 29
    assert mon.stalled() == []
    clock.t += 2
    assert mon.stalled() == ["capture"]
    n[0] += 1  # progress clears it at once
    assert mon.stalled() == []
    busy[0] = False  # nothing expected (a finite source ended): never stalled
    clock.t += 100
    assert mon.stalled() == []


def _paced_tick(sup: Supervision) -> None:
    """One tick, then time for the listener to drain: the kernel queues at most
    net.unix.max_dgram_qlen (10 here) datagrams, and a burst of ticks faster than the
    listener thread reads made the non-blocking sender drop the STALLED status."""
    sup.tick()
    time.sleep(0.05)


def test_pings_stop_while_a_stage_stalls_and_resume_when_it_recovers(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify")
    clock, blocks = Clock(), [0]
    env = {**listener.env, "WATCHDOG_USEC": "20000000"}  # WatchdogSec=20: ping every 10 s
    stages = [Stage("capture", lambda: blocks[0]), Stage("uplink", lambda: int(clock.t))]
    sup = Supervision(
        _cfg(tmp_path),
        stages=stages,
        status=_status,
        metrics=EdgeMetrics("pi-00", "1.2.3"),
        env=env,
        clock=clock,
    )
    try:
        sup.start()
        assert listener.wait_for("READY", "1")["STATUS"].startswith("listening;")
        for _ in range(6):  # 60 s of progress: a ping every 10 s
            blocks[0] += 1
            clock.t += 10
            _paced_tick(sup)
        listener.wait_for("WATCHDOG", "1")
        assert sup.pings == 6
        for _ in range(8):  # capture stands still for 80 s
            clock.t += 10
            _paced_tick(sup)
        assert sup.stalled == ["capture"]
        assert sup.pings <= 6 + 3  # pinged only until stall_s (30 s) passed
        stalled_pings = sup.pings
        for _ in range(3):
            clock.t += 10
            _paced_tick(sup)
        assert sup.pings == stalled_pings  # systemd's WatchdogSec expires now
        listener.wait_for("STATUS", "STALLED: capture")  # datagrams arrive asynchronously
        assert sup.metrics.metrics.get("up", device="pi-00") == 0
        assert sup.metrics.metrics.get("stage_stalled", device="pi-00", stage="capture") == 1
        blocks[0] += 1
        clock.t += 10
        _paced_tick(sup)
        assert sup.pings == stalled_pings + 1 and sup.stalled == []
    finally:
        sup.close()
        listener.close()
    assert listener.wait_for("STOPPING", "1")


def test_status_over_the_control_socket_includes_version_and_health(tmp_path: Path) -> None:
    sup = Supervision(
        _cfg(tmp_path), stages=[], status=_status, metrics=EdgeMetrics("pi-00", "1.2.3"), env={}
    )
    sup.start()
    try:
        st = query(tmp_path / "state" / "control.sock")
        assert st["version"] == "1.2.3" and st["device_id"] == "pi-00"
        assert st["health"] == {"stalled": [], "watchdog_pings": 0}
        assert st["ota"]["state"] == "applied"
    finally:
        sup.close()
    assert not (tmp_path / "state" / "control.sock").exists()


def test_control_socket_goes_to_the_runtime_directory_under_systemd(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert control_socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/edge-daemon"}) == Path(
        "/run/edge-daemon/control.sock"
    )
    assert control_socket_path(cfg, {}) == tmp_path / "state" / "control.sock"
    explicit = _cfg(tmp_path, control_socket=str(tmp_path / "c.sock"))
    assert control_socket_path(explicit, {"RUNTIME_DIRECTORY": "/run/x"}) == tmp_path / "c.sock"


def test_metrics_follow_the_status_report() -> None:
    em = EdgeMetrics("pi-00", "1.2.3")
    em.update(_status())
    mm = em.metrics
    assert mm.get("gate_windows_removed_total", device="pi-00") == 1
    assert mm.get("inferences_total", device="pi-00", label="siren") == 2
    assert mm.get("buffer_bytes", device="pi-00") == 4096
    assert mm.get("uploads_pending", device="pi-00") == 2
    assert mm.get("uploads_sent_total", device="pi-00") == 4
    assert mm.get("ota_state", device="pi-00", state="applied") == 1
    assert mm.get("ota_adapter_version", device="pi-00") == 2
