"""The broker goes away while a device samples its sensors: what it measured meanwhile is
stored unpublished and, once the broker is back, re-published oldest first at QoS 1
until nothing is left unpublished.

Real components: Mosquitto from devstack (mTLS, per-device ACL), stopped by its PID and
started again on the same port with the same certificates (``stop_broker``,
``restart_broker``); the device's ``MqttLink`` with a client certificate from the dev
fleet CA; ``DeviceSensors`` (sampler, store, resender) reading a fake sysfs tree every
0.2 s and publishing through the two paths ``EdgeApp`` uses (live at QoS 0 without
waiting; held back at QoS 1, marked published on the broker's PUBACK). A cloud-side
``MqttLink`` (the admin identity) records every telemetry message.

The dev broker keeps no sessions (``persistence false``): after the restart, a message
published before the recorder has subscribed again is acknowledged by the broker and
reaches no one. That drop is the broker's, not the device's, so the resender's
``link_up`` here is the device link's state *and* "the recorder listens again" (a probe
that a second device publishes on its own telemetry topic came back to the recorder: the
admin identity reads devices' telemetry but may not publish it). Live messages are QoS 0, at most once: one written
in the instant the broker goes away is lost although the device counted it as sent. The
no-loss check therefore leaves out live readings sampled while the broker was being
stopped (the test stops it just after a live message, far from the next sample) and
between the restart and the recorder's return; every other reading must arrive.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.mosquitto import Broker, restart_broker, start_broker, stop_broker
from devstack.pki import DevCA
from devstack.procs import ProcessGroup
from edge_daemon.config import DeviceConfig
from edge_daemon.sensors.runtime import DeviceSensors
from fleet_protocol import topics
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink
from fleet_protocol.telemetry import Telemetry

pytestmark = pytest.mark.integration

DEVICE = "pi-outage"
ADMIN = "cloud-sidecar"
PROBE_DEVICE = "pi-probe"
PROBE = topics.telemetry(PROBE_DEVICE)
SAMPLE_S = 0.2
RESEND_S = 0.5
Key = tuple[int, str, str]  # (time_ms, sensor, quantity): one reading


def _wait(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Recorder:
    """The cloud side: every payload on the device's telemetry topic, in arrival order."""

    def __init__(self, endpoint: MqttEndpoint, probe_endpoint: MqttEndpoint) -> None:
        self._lock = threading.Lock()
        self._payloads: list[bytes] = []
        self._probes: set[bytes] = set()
        self.link = MqttLink(
            endpoint,
            client_id="telemetry-recorder",
            on_message=self._on_message,
            subscriptions=[(topics.telemetry(DEVICE), 1), (PROBE, 1)],
        )
        self.probe_link = MqttLink(probe_endpoint, PROBE_DEVICE, lambda _t, _p: None)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if topic == PROBE:
                self._probes.add(payload)
            else:
                self._payloads.append(payload)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return list(self._payloads)

    def messages(self) -> list[Telemetry]:
        return [Telemetry.from_bytes(p) for p in self.payloads()]

    def keys(self) -> set[Key]:
        return {(t.time_ms, r.sensor, r.quantity) for t in self.messages() for r in t.readings}

    def listening(self) -> bool:
        """A probe device publishes; True once it comes back (the recorder is subscribed)."""
        probe = str(time.monotonic_ns()).encode()
        if not self.probe_link.publish(PROBE, probe, qos=1, timeout_s=1):
            return False
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with self._lock:
                if probe in self._probes:
                    return True
            time.sleep(0.02)
        return False


@dataclass
class Rig:
    procs: ProcessGroup
    broker: Broker
    device_link: MqttLink
    recorder: Recorder
    sensors: DeviceSensors
    cloud_listening: threading.Event
    resent: list[Telemetry]  # what the resender re-published and the broker acknowledged


def _fake_sysfs(root: Path) -> Path:
    chip = root / "class/hwmon/hwmon0"
    chip.mkdir(parents=True)
    for name, value in {
        "name": "cpu_thermal",
        "temp1_input": "48312",
        "fan1_input": "1200",
    }.items():
        (chip / name).write_text(value + "\n")
    return root


def _config(state_dir: Path, sysfs: Path, endpoint: MqttEndpoint) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "device_id": DEVICE,
            "state_dir": str(state_dir),
            "broker": {
                "host": endpoint.host,
                "port": endpoint.port,
                "ca_cert": str(endpoint.ca_cert),
                "client_cert": str(endpoint.client_cert),
                "client_key": str(endpoint.client_key),
            },
            "tpm": {},
            "cloud": {"unwrap_public_key": "u.pem", "ota_public_key": "o.pem"},
            "model": {"base_fp32": "a.onnx", "base_int8": "b.onnx"},
            "source": {"type": "live"},
            "sensors": {
                "period_s": SAMPLE_S,
                "sysfs_root": str(sysfs),
                "sources": [{"type": "hwmon", "name": "soc", "chip": "cpu_thermal"}],
                "laeq": {"enabled": False},
            },
        }
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ca = DevCA.create(tmp_path / "ca")
    # Run as root, the broker drops to user mosquitto, which cannot traverse pytest's
    # 0700 basetemp; its working directory lives in a world-traversable temp dir.
    broker_root = Path(tempfile.mkdtemp(prefix="se-outage-broker-"))
    broker_root.chmod(0o755)
    try:
        with ProcessGroup(tmp_path / "logs") as procs:
            broker = start_broker(procs, broker_root / "broker", ca, admin_identities=(ADMIN,))

            def endpoint(cn: str) -> MqttEndpoint:
                pair = ca.issue_client(cn)
                return MqttEndpoint(broker.host, broker.port, ca.cert_path, pair.cert, pair.key)

            device_ep = endpoint(DEVICE)
            recorder = Recorder(endpoint(ADMIN), endpoint(PROBE_DEVICE))
            recorder.link.start(wait_s=10)
            recorder.probe_link.start(wait_s=10)
            link = MqttLink(device_ep, client_id=DEVICE, on_message=lambda _t, _p: None)
            link.start(wait_s=10)
            cfg = _config(tmp_path / "state", _fake_sysfs(tmp_path / "sys"), device_ep)
            cfg.state_dir.mkdir()
            cloud_listening = threading.Event()
            cloud_listening.set()
            topic = topics.telemetry(DEVICE)
            resent: list[Telemetry] = []

            def publish(t: Telemetry) -> bool:  # EdgeApp._publish_telemetry
                return link.publish(topic, t.to_bytes(), qos=0, timeout_s=0)

            def republish(t: Telemetry) -> bool:  # EdgeApp._republish_telemetry
                ok = link.publish(topic, t.to_bytes(), qos=1, timeout_s=5)
                if ok:
                    resent.append(t)
                return ok

            sensors = DeviceSensors(
                cfg,
                publish,
                link_up=lambda: link.connected and cloud_listening.is_set(),
                republish=republish,
            )
            assert sensors.resender is not None
            sensors.resender.period_s = RESEND_S  # the daemon checks every 5 s
            try:
                yield Rig(procs, broker, link, recorder, sensors, cloud_listening, resent)
            finally:
                sensors.close()
                link.stop()
                recorder.link.stop()
                recorder.probe_link.stop()
    finally:
        shutil.rmtree(broker_root, ignore_errors=True)


def test_telemetry_held_back_by_a_broker_outage_is_resent_after_it_returns(rig: Rig) -> None:
    sensors, store, recorder = rig.sensors, rig.sensors.store, rig.recorder
    sensors.start()
    _wait("live telemetry", lambda: len(recorder.payloads()) >= 3, 10)
    assert store.unpublished_count() == 0, "the broker was up, yet something was held back"

    # the outage: stop the broker just after a live message, far from the next sample
    rig.cloud_listening.clear()
    n = len(recorder.payloads())
    _wait("a live message", lambda: len(recorder.payloads()) > n, 5)
    old_pid, stopping_ms = rig.broker.child.pid, _now_ms()
    stop_broker(rig.procs, rig.broker)
    down_ms = _now_ms()
    _wait("the device to see the outage", lambda: not rig.device_link.connected, 5)
    _wait("readings held back", lambda: store.unpublished_count() >= 10, 10)  # 5 samples x 2
    restart_ms = _now_ms()
    held = {(t, r.sensor, r.quantity) for _, t, _, r in store.unpublished(10_000)}

    restart_broker(rig.procs, rig.broker)  # same port, same certificates and ACL
    assert rig.broker.child.pid != old_pid and rig.broker.child.alive()
    _wait("the recorder to listen again", recorder.listening, 20)
    listening_ms = _now_ms()
    rig.cloud_listening.set()
    _wait("the device to reconnect", lambda: rig.device_link.connected, 20)
    _wait("the backlog to be resent", lambda: store.unpublished_count() == 0, 15)
    time.sleep(3 * SAMPLE_S)  # a few live samples after the backlog
    rows = [(t, r.sensor, r.quantity) for t, r in reversed(store.recent(100_000))]
    time.sleep(0.3)  # live QoS 0 messages of those rows still on the wire
    received, messages = recorder.keys(), recorder.messages()

    # every reading sampled during the outage was held back, then reached the cloud
    outage = {k for k in rows if down_ms <= k[0] < restart_ms}
    assert outage and outage <= held, "a reading was marked sent during the outage"
    assert held <= received, f"lost: {sorted(held - received)[:5]}"
    # ... re-published by the resender, once each and oldest first: what the store held
    # when the link came back (the outage, and what was sampled until the reconnect)
    resent_keys = {(t.time_ms, r.sensor, r.quantity) for t in rig.resent for r in t.readings}
    resent_times = [t.time_ms for t in rig.resent]
    assert held <= resent_keys and resent_times == sorted(set(resent_times))
    first_seen = list(dict.fromkeys(t.time_ms for t in messages if t.time_ms in resent_times))
    assert first_seen == resent_times, "the cloud did not get the backlog oldest first"
    report = sensors.report()
    assert report["telemetry_resent"] == len(rig.resent)
    assert report["telemetry_unpublished_rows"] == 0

    # no reading lost anywhere, but for two windows where QoS 0 live messages may be:
    # while the broker was being stopped (at most once by design: one written to a
    # socket the broker no longer reads is counted as sent), and after the restart until
    # the recorder had subscribed again (the broker acknowledges and drops it)
    lost = [
        k
        for k in rows
        if k not in received
        and not stopping_ms <= k[0] < down_ms
        and not restart_ms <= k[0] <= listening_ms
    ]
    assert not lost, f"lost: {lost[:5]}"
    measured = {(t, r.sensor, r.quantity) for t, r in store.recent(100_000)}  # after `received`
    assert received <= measured, "the cloud got a reading the device never measured"
    assert all(t.device == DEVICE for t in messages)
    # duplicates only of the at-least-once kind: a whole message received again byte for
    # byte (a resend whose PUBACK was lost, or paho's own retransmission on reconnect);
    # no reading is ever in two different messages
    per_reading = Counter(
        (t.time_ms, r.sensor, r.quantity)
        for t in map(Telemetry.from_bytes, set(recorder.payloads()))
        for r in t.readings
    )
    assert max(per_reading.values()) == 1
