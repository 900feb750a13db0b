"""Both services as systemd runs them, as far as this machine allows.

The edge daemon runs as `edge-daemon run` in its own process under a small stand-in for
systemd (``Supervisor``): it reads the daemon's sd_notify messages on a NOTIFY_SOCKET,
passes WATCHDOG_USEC as systemd does for ``WatchdogSec=``, aborts the daemon with
SIGABRT when the pings stop for longer than that, and restarts it
(``Restart=on-failure``). The microphone is ALSA's ``file`` plugin on a FIFO
(tests/integration/alsa_mic.py); holding the FIFO wedges capture as a dead I2S driver
would. Real Mosquitto (mTLS), swtpm and SoftHSM.

Checked: READY=1 and STATUS lines; pings while audio flows; the metrics endpoint
scraped and parsed by prometheus-client's parser; `edge-daemon status` over the control
socket; a stalled capture stops the pings, systemd's watchdog kills the daemon and the
restarted daemon is READY and pinging again. The sidecar's endpoint is scraped too, and
a sidecar whose MQTT loop hangs on one message stops its pings until the loop moves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sidecar.app import SidecarApp
from cloud_sidecar.config import MetricsConfig, load_config
from devstack.procs import free_port
from devstack.provision import device_config
from fleet_protocol import topics
from fleet_protocol.io.mqtt import MqttLink
from tests.notify_listener import NotifyListener

from .alsa_mic import BLOCK, DEVICE, AlsaMic, PacedWriter
from .conftest import Cloud

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WATCHDOG_S = 8.0  # WatchdogSec= for the test (the unit file says 120)
STALL_S = 5.0  # service.stall_s


try:  # prometheus-client's parser; until it is in requirements/lock.txt the rest still runs
    from prometheus_client import parser as prom_parser
except ImportError:  # pragma: no cover - depends on the environment
    prom_parser = None


def _families(text: str) -> dict[str, Any] | None:
    """The exposition parsed by the client library, or None where it is not installed."""
    if prom_parser is None:
        return None
    return {f.name: f for f in prom_parser.text_string_to_metric_families(text)}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


class Supervisor:
    """systemd's part for one ``Type=notify`` service with ``WatchdogSec=`` and restarts."""

    def __init__(self, argv: list[str], env: dict[str, str], notify: NotifyListener, log: Path):
        self.argv, self.env, self.notify, self.log = argv, env, notify, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog_kills = 0
        self.starts = 0

    def start(self) -> None:
        env = dict(self.env, WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)))
        env.update(self.notify.env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=log, stderr=log)
        self.starts += 1

    def ready_after(self, n_messages: int, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self._tail()
            for m in self.notify.messages[n_messages:]:
                if m.get("READY") == "1":
                    return m
            time.sleep(0.2)
        raise AssertionError(f"no READY=1 within {timeout} s\n{self._tail()}")

    def watch(self, ready_at: float, timeout: float) -> bool:
        """Enforce WatchdogSec= for up to ``timeout`` s; True when it killed the daemon."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            last = max(ready_at, time.monotonic() - self.notify.last_ping_age())
            if time.monotonic() - last > WATCHDOG_S:
                self.proc.send_signal(signal.SIGABRT)  # systemd's WatchdogSignal=
                self.proc.wait(30)
                self.watchdog_kills += 1
                return True
            time.sleep(0.2)
        return False

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def _wait(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class _Endless:
    """The same 100 ms block of noise for ever, in the shape ``PacedWriter`` indexes."""

    def __init__(self, block: bytes) -> None:
        self.block = block

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> bytes:
        return self.block


@pytest.fixture
def mic(tmp_path: Path) -> Iterator[tuple[AlsaMic, PacedWriter]]:
    mic = AlsaMic(tmp_path / "alsa", tmp_path / "alsa" / "mic.fifo")
    noise = (np.random.default_rng(5).standard_normal(BLOCK) * 0.06).astype("<f4")
    writer = PacedWriter(mic.infile, np.zeros(BLOCK, np.int16))
    writer.blocks = _Endless(noise.tobytes())  # type: ignore[assignment]
    writer.start()
    yield mic, writer
    writer.stop()


def test_a_stalled_capture_stops_the_watchdog_and_the_restarted_daemon_is_ready_again(
    cloud: Cloud, base_model: Any, mic: tuple[AlsaMic, PacedWriter], tmp_path: Path
) -> None:
    alsa, writer = mic
    slot = cloud.stack.devices[0]
    source = {"type": "live", "device": DEVICE, "block_ms": 100}
    path = device_config(
        cloud.stack, slot, base_model.dir, (cloud.unwrap_pem, cloud.ota_pem), source
    )
    cfg = json.loads(path.read_text())
    port = free_port()
    sock = tmp_path / "ctl.sock"
    cfg["service"] = {"metrics_port": port, "stall_s": STALL_S, "control_socket": str(sock)}
    cfg["capture"] = {"isolation": "process"}
    path.write_text(json.dumps(cfg))
    notify = NotifyListener(tmp_path / "notify.sock")
    sup = Supervisor(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
        alsa.env(),
        notify,
        tmp_path / "daemon.log",
    )
    try:
        sup.start()
        ready = sup.ready_after(0, 180)
        ready_at = time.monotonic()
        assert "windows" in ready.get("STATUS", "")
        _wait("watchdog pings", lambda: notify.pings() >= 2, 3 * WATCHDOG_S)
        assert not sup.watch(ready_at, 2 * WATCHDOG_S)  # audio flows: never killed

        # -- metrics: the endpoint, parsed by the client library's parser ---------------
        _wait("inferences", lambda: "edge_inferences_total{" in _scrape(port), 60)
        text = _scrape(port)
        assert f'edge_up{{device="{slot.device_id}"}} 1.0' in text
        fams = _families(text)
        if fams is not None:
            for name in ("edge_up", "edge_audio_blocks", "edge_gate_windows", "edge_buffer_bytes"):
                assert name in fams, sorted(fams)
            latency = fams["edge_inference_latency_seconds"]
            count = [s for s in latency.samples if s.name.endswith("_count")]
            assert count and count[0].value >= 1
            assert count[0].labels["device"] == slot.device_id
            assert [s.value for s in fams["edge_up"].samples] == [1.0]

        # -- `edge-daemon status` over the control socket ------------------------------
        out = subprocess.run(
            [sys.executable, "-m", "edge_daemon", "status", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert f"device   {slot.device_id}" in out and "state    listening" in out
        assert "buffer " in out and "adapter v0" in out

        # -- capture wedges: pings stop, the watchdog kills, the restart is READY -------
        pings_before = notify.pings()
        writer.hold()
        n_messages = len(notify.messages)
        assert sup.watch(ready_at, STALL_S + 3 * WATCHDOG_S), "the watchdog never fired"
        assert sup.proc is not None and sup.proc.returncode == -signal.SIGABRT
        assert notify.pings() <= pings_before + 2  # at most the pings before stall_s ran out
        assert any(s.startswith("STALLED: capture") for s in notify.statuses())
        writer.release()
        sup.start()  # Restart=on-failure
        sup.ready_after(n_messages, 180)
        ready_at = time.monotonic()
        pings_after = notify.pings()
        _wait("pings from the restarted daemon", lambda: notify.pings() >= pings_after + 2, 30)
        assert not sup.watch(ready_at, WATCHDOG_S)
        assert sup.stop() == 0
        notify.wait_for("STOPPING", "1")  # only the clean stop says so (SIGABRT does not)
    finally:
        sup.stop()
        notify.close()


def test_the_sidecar_endpoint_is_scraped_and_parsed(cloud: Cloud, tmp_path: Path) -> None:
    cfg = load_config(cloud.config)
    cfg = cfg.model_copy(update={"data_dir": tmp_path / "data", "metrics": MetricsConfig(port=0)})
    notify = NotifyListener(tmp_path / "notify.sock")
    saved = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET",)}
    os.environ["NOTIFY_SOCKET"] = str(notify.path)
    app = SidecarApp(cfg)
    stop, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=app.run, args=(stop, started), daemon=True)
    thread.start()
    try:
        assert started.wait(60)
        assert notify.wait_for("READY", "1")["STATUS"].startswith("serving")
        text = _scrape(app.metrics_port)
        assert "sidecar_up 1.0" in text
        fams = _families(text)
        if fams is not None:
            assert [s.value for s in fams["sidecar_up"].samples] == [1.0]
            for name in (
                "sidecar_ingest_rejected",
                "sidecar_hsm_unwraps",
                "sidecar_rollout_devices",
            ):
                assert name in fams
        notify.wait_for("WATCHDOG", "1", timeout=10)
    finally:
        stop.set()
        thread.join(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        notify.close()
    assert notify.wait_for("STOPPING", "1")


def test_a_stalled_sidecar_loop_stops_the_watchdog_pings_until_it_moves_again(
    cloud: Cloud, tmp_path: Path
) -> None:
    """A device message whose handler hangs (as a hung HSM call or a database lock would)
    holds the MQTT loop: past stall_s the sidecar says STALLED and sends no WATCHDOG=1,
    so systemd's WatchdogSec= would restart it; released, the pings come back."""
    stall_s = 2.0
    cfg = load_config(cloud.config)
    cfg = cfg.model_copy(
        update={"data_dir": tmp_path / "data", "metrics": MetricsConfig(port=0), "stall_s": stall_s}
    )
    notify = NotifyListener(tmp_path / "notify.sock")
    saved = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(notify.path)
    app = SidecarApp(cfg)
    stop, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=app.run, args=(stop, started), daemon=True)
    thread.start()
    release, held = threading.Event(), threading.Event()
    slot = cloud.stack.devices[1]
    device = MqttLink(
        cloud.stack.endpoint(slot.cert), f"{slot.device_id}-stall", lambda _t, _p: None
    )
    try:
        assert started.wait(60)
        notify.wait_for("READY", "1")
        _wait("pings while idle", lambda: notify.pings() >= 2, 10)

        def hang(topic: str, payload: bytes) -> None:
            held.set()
            release.wait(60)

        app.device_messages.handle = hang  # type: ignore[method-assign]
        device.start(wait_s=15)
        # the shared subscription deals messages to both sidecars serving: send until one
        # reaches this one
        for _ in range(20):
            assert device.publish(topics.events(slot.device_id), b"{}", qos=1, timeout_s=10)
            if held.wait(1.0):
                break
        assert held.is_set(), "the stalled sidecar never got a device message"
        _wait(
            "STALLED status",
            lambda: any(s.startswith("STALLED: mqtt") for s in notify.statuses()),
            15,
        )
        text = _scrape(app.metrics_port)
        assert 'sidecar_loop_stalled{loop="mqtt"} 1.0' in text
        assert 'sidecar_loop_stalled{loop="hsm_reopen"} 0.0' in text
        pings = notify.pings()
        time.sleep(3 * stall_s)
        assert notify.pings() == pings and notify.last_ping_age() > 2 * stall_s

        release.set()
        _wait("pings again", lambda: notify.pings() >= pings + 2, 15)
        assert notify.statuses()[-1].startswith("serving")
        assert 'sidecar_loop_stalled{loop="mqtt"} 0.0' in _scrape(app.metrics_port)
    finally:
        release.set()
        device.stop()
        stop.set()
        thread.join(30)
        if saved is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        else:
            os.environ["NOTIFY_SOCKET"] = saved
        notify.close()
