"""A real Mosquitto with mTLS admits only live dev-CA certificates and enforces the fleet ACL.

Clients: Debian's ``mosquitto_pub``/``mosquitto_sub``, paho-mqtt 2.x, and a raw
``ssl`` socket that reads the TLS alert the broker sends when it refuses a certificate.
The ACL is ``fleet_protocol.acl``'s: devices, the admin (the sidecar's identity), two
label sources, and an observer (tests only) that reads every topic, so "not delivered"
means not delivered to anyone, not only to the admin.
"""

from __future__ import annotations

import datetime as dt
import queue
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from devstack.mosquitto import Broker, reload_broker, start_broker
from devstack.pki import CertPair, DevCA
from devstack.procs import ProcessGroup, require_tool

pytestmark = pytest.mark.integration

ADMIN = "cloud-sidecar"
PUBLISHER = "cloud-sidecar-ota"  # the OTA publisher: the only identity that writes the OTA tree
SOURCE, OTHER_SOURCE = "city-labels", "reviewer-1"
OBSERVER = "test-observer"
TIMEOUT = 5.0
QUIET = 1.0  # how long "not delivered" waits after a control message that was delivered


@dataclass(frozen=True)
class Stack:
    ca: DevCA
    broker: Broker
    admin: CertPair
    publisher: CertPair
    rogue_ca: DevCA
    source: CertPair
    other_source: CertPair
    observer: CertPair


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_tool("mosquitto_pub")
    ca = DevCA.create(tmp_path_factory.mktemp("pki") / "ca")
    rogue = DevCA.create(tmp_path_factory.mktemp("rogue") / "ca", name="someone else's CA")
    # Run as root, the broker drops to user mosquitto, which cannot traverse pytest's
    # 0700 basetemp; its working directory lives in a world-traversable temp dir.
    broker_root = Path(tempfile.mkdtemp(prefix="se-broker-test-"))
    procs = ProcessGroup(tmp_path_factory.mktemp("logs"))
    try:
        broker_root.chmod(0o755)
        broker = start_broker(
            procs,
            broker_root / "broker",
            ca,
            admin_identities=(ADMIN,),
            label_sources=(SOURCE, OTHER_SOURCE),
            observers=(OBSERVER,),
            ota_publishers=(PUBLISHER,),
        )
        yield Stack(
            ca,
            broker,
            ca.issue_client(ADMIN),
            ca.issue_client(PUBLISHER),
            rogue,
            ca.issue_client(SOURCE),
            ca.issue_client(OTHER_SOURCE),
            ca.issue_client(OBSERVER),
        )
    finally:
        procs.close()
        shutil.rmtree(broker_root, ignore_errors=True)


class Client:
    """A paho-mqtt 2.x MQTT v5 client with blocking helpers."""

    def __init__(self, broker: Broker, pair: CertPair, ca_cert: Path) -> None:
        self.broker = broker
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: ReasonCode | None = None
        self._connected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self.mqtt.tls_set(ca_certs=str(ca_cert), certfile=str(pair.cert), keyfile=str(pair.key))
        self.mqtt.max_inflight_messages_set(20)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_connect_fail = lambda _c, _u: self._connected.set()
        self.mqtt.on_disconnect = lambda *_a: self._connected.set()
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_publish = self._on_publish

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def _ack(self, mid: int, value: Any) -> None:
        with self._acked:
            self._acks[mid] = value
            self._acked.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        self._ack(mid, rcs)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._ack(mid, rc)

    def _wait_ack(self, mid: int) -> Any:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, TIMEOUT), f"no ack for {mid}"
            return self._acks.pop(mid)

    def connect(self) -> bool:
        """True when the broker accepted the connection (CONNACK success)."""
        try:
            self.mqtt.connect(self.broker.host, self.broker.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.mqtt.loop_start()
        self._connected.wait(TIMEOUT)
        if self.connack is None or self.connack.is_failure:
            self.close()  # or paho's loop keeps reconnecting
            return False
        return True

    def subscribe(self, topic: str) -> ReasonCode:
        # Retained messages are left out so that tests do not see each other's.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        _, mid = self.mqtt.subscribe(topic, options=options)
        assert mid is not None
        codes: list[ReasonCode] = self._wait_ack(mid)
        return codes[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        rc: ReasonCode = self._wait_ack(info.mid)
        return rc

    def expect(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait for ``(topic, payload)``, then ``QUIET`` more; return everything else seen."""
        others: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{topic} {payload!r} not delivered; saw {others}"
            try:
                got = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if got == (topic, payload):
                break
            others.append(got)
        time.sleep(QUIET)
        while not self.messages.empty():
            others.append(self.messages.get_nowait())
        return others

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def clients(stack: Stack) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _connected(stack: Stack, clients: list[Client], pair: CertPair) -> Client:
    client = Client(stack.broker, pair, stack.ca.cert_path)
    assert client.connect(), f"connection refused: {client.connack}"
    clients.append(client)
    return client


def _admin(stack: Stack, clients: list[Client], topic: str = "fleet/#") -> Client:
    admin = _connected(stack, clients, stack.admin)
    assert not admin.subscribe(topic).is_failure
    return admin


def _observer(stack: Stack, clients: list[Client]) -> Client:
    """Reads every topic: what it does not get, the broker did not accept."""
    observer = _connected(stack, clients, stack.observer)
    assert not observer.subscribe("#").is_failure
    return observer


def _mosquitto_pub(stack: Stack, pair: CertPair | None, topic: str, message: str) -> int:
    argv = ["mosquitto_pub", "-h", "localhost", "-p", str(stack.broker.port), "-V", "mqttv5"]
    argv += ["--cafile", str(stack.ca.cert_path), "-q", "1", "-t", topic, "-m", message]
    if pair is not None:
        argv += ["--cert", str(pair.cert), "--key", str(pair.key)]
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT * 2, check=False).returncode


def _tls(stack: Stack, pair: CertPair | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(stack.ca.cert_path))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def _tls_alert(stack: Stack, pair: CertPair | None) -> str:
    """The OpenSSL reason of the alert the broker sends right after the handshake.

    With TLS 1.3 the client finishes its side of the handshake before the server
    has checked the client certificate; the refusal arrives as an alert on the
    first read. Nothing is sent, so the broker has no unread data when it closes
    (which would turn its close into a reset that swallows the alert).
    """
    try:
        with (
            socket.create_connection((stack.broker.host, stack.broker.port), TIMEOUT) as raw,
            _tls(stack, pair).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            data = tls.recv(4)
    except ssl.SSLError as e:
        return str(e.reason)
    except TimeoutError:
        return "no alert"
    return f"no alert; read {data!r}"


def _mqtt_accepts(stack: Stack, pair: CertPair) -> bool:
    """True when the broker answers an MQTT CONNECT over TLS with a successful CONNACK."""
    client_id = b"tls-probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with (
            socket.create_connection((stack.broker.host, stack.broker.port), TIMEOUT) as raw,
            _tls(stack, pair).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(bytes([0x10, len(body)]) + body)
            return tls.recv(4) == b"\x20\x02\x00\x00"
    except (ssl.SSLError, OSError):
        return False


def test_device_publishes_own_upload_and_admin_receives_it(
    stack: Stack, clients: list[Client]
) -> None:
    device = stack.ca.issue_client("dev-upload")
    admin = _admin(stack, clients)
    assert _mosquitto_pub(stack, device, "fleet/v1/dev-upload/upload", "batch-1") == 0
    assert admin.expect("fleet/v1/dev-upload/upload", b"batch-1") == []


def test_device_reads_retained_ota_metadata(stack: Stack, clients: list[Client]) -> None:
    device = stack.ca.issue_client("dev-ota-reader")
    admin = _connected(stack, clients, stack.publisher)  # the OTA publisher
    topic = "fleet/v1/ota/stable/timestamp.json"
    assert not admin.publish(topic, b'{"v":1}', retain=True).is_failure
    argv = ["mosquitto_sub", "-h", "localhost", "-p", str(stack.broker.port), "-V", "mqttv5"]
    argv += ["--cafile", str(stack.ca.cert_path), "--cert", str(device.cert)]
    argv += ["--key", str(device.key), "-t", topic, "-C", "1", "-W", "5"]
    out = subprocess.run(argv, capture_output=True, timeout=TIMEOUT * 2, check=False)
    assert not admin.publish(topic, b"", retain=True).is_failure  # clear it
    assert out.returncode == 0
    assert out.stdout.strip() == b'{"v":1}'


def test_client_without_certificate_is_refused_at_tls_handshake(stack: Stack) -> None:
    assert _tls_alert(stack, None) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert _mosquitto_pub(stack, None, "fleet/v1/anon/upload", "x") != 0


def test_client_with_certificate_of_another_ca_is_refused(stack: Stack) -> None:
    impostor = stack.rogue_ca.issue_client("dev-upload")
    assert _tls_alert(stack, impostor) == "TLSV1_ALERT_UNKNOWN_CA"
    assert not Client(stack.broker, impostor, stack.ca.cert_path).connect()


def test_device_cannot_read_another_devices_ack(stack: Stack, clients: list[Client]) -> None:
    a = _connected(stack, clients, stack.ca.issue_client("dev-a"))
    # Mosquitto 2.0 grants the SUBACK and applies the read ACL on delivery.
    a.subscribe("fleet/v1/dev-b/ack")
    assert not a.subscribe("fleet/v1/dev-a/ack").is_failure
    admin = _connected(stack, clients, stack.admin)
    assert not admin.publish("fleet/v1/dev-b/ack", b"for-b").is_failure
    assert not admin.publish("fleet/v1/dev-a/ack", b"for-a").is_failure
    assert a.expect("fleet/v1/dev-a/ack", b"for-a") == []


def test_device_publish_into_another_devices_upload_is_not_delivered(
    stack: Stack, clients: list[Client]
) -> None:
    admin = _admin(stack, clients)
    a = _connected(stack, clients, stack.ca.issue_client("dev-a"))
    assert a.publish("fleet/v1/dev-b/upload", b"forged").getName() == "Not authorized"
    assert not a.publish("fleet/v1/dev-a/upload", b"own").is_failure
    assert admin.expect("fleet/v1/dev-a/upload", b"own") == []


def test_device_cannot_publish_into_the_ota_tree(stack: Stack, clients: list[Client]) -> None:
    observer = _observer(stack, clients)
    device = stack.ca.issue_client("dev-ota-writer")
    assert _mosquitto_pub(stack, device, "fleet/v1/ota/stable/targets.json", "evil") == 0
    assert _mosquitto_pub(stack, device, "fleet/v1/dev-ota-writer/ota/status", "ok") == 0
    assert observer.expect("fleet/v1/dev-ota-writer/ota/status", b"ok") == []


def test_revoked_certificate_is_refused_after_reload(stack: Stack) -> None:
    first = stack.ca.issue_client("dev-revoked-1")
    second = stack.ca.issue_client("dev-revoked-2")
    assert _mqtt_accepts(stack, first)
    stack.ca.revoke(first.cert)
    reload_broker(stack.broker)
    assert _tls_alert(stack, first) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    # A second revocation must win over the CRL the broker loaded before.
    assert _mqtt_accepts(stack, second)
    stack.ca.revoke(second.cert)
    reload_broker(stack.broker)
    assert _tls_alert(stack, second) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert _mqtt_accepts(stack, stack.admin)


def test_expired_certificate_is_refused(stack: Stack) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = stack.ca.issue_client("dev-expired", valid_days=1, not_before=start)
    assert _tls_alert(stack, expired) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    assert not Client(stack.broker, expired, stack.ca.cert_path).connect()


def _mosquitto_sub(
    stack: Stack, pair: CertPair, topics: list[str], count: int
) -> subprocess.Popen[bytes]:
    """A real ``mosquitto_sub`` printing ``topic payload`` lines, exiting after ``count`` messages."""
    argv = ["mosquitto_sub", "-h", "localhost", "-p", str(stack.broker.port), "-V", "mqttv5", "-v"]
    argv += ["--cafile", str(stack.ca.cert_path), "--cert", str(pair.cert), "--key", str(pair.key)]
    argv += ["-C", str(count), "-W", "10"]
    for t in topics:
        argv += ["-t", t]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_mosquitto_sub_as_device_a_never_receives_device_b_traffic(
    stack: Stack, clients: list[Client]
) -> None:
    """Real clients: A subscribes to B's ack and upload and to its own ack; only its own arrives."""
    a = stack.ca.issue_client("dev-sub-a")
    b = _connected(stack, clients, stack.ca.issue_client("dev-sub-b"))
    sub = _mosquitto_sub(
        stack,
        a,
        ["fleet/v1/dev-sub-b/ack", "fleet/v1/dev-sub-b/upload", "fleet/v1/dev-sub-a/ack"],
        1,
    )
    admin = _connected(stack, clients, stack.admin)
    deadline = time.monotonic() + 10
    while sub.poll() is None and time.monotonic() < deadline:  # until the subscription is live
        assert not admin.publish("fleet/v1/dev-sub-b/ack", b"for-b").is_failure
        assert not b.publish("fleet/v1/dev-sub-b/upload", b"b-data").is_failure
        assert not admin.publish("fleet/v1/dev-sub-a/ack", b"for-a").is_failure
        time.sleep(0.3)
    out, _ = sub.communicate(timeout=10)
    assert sub.returncode == 0
    assert out.strip() == b"fleet/v1/dev-sub-a/ack for-a"


def test_mosquitto_pub_as_device_a_cannot_publish_as_device_b(
    stack: Stack, clients: list[Client]
) -> None:
    a = stack.ca.issue_client("dev-pub-a")
    admin = _admin(stack, clients)
    assert (
        _mosquitto_pub(stack, a, "fleet/v1/dev-pub-b/upload", "forged") == 0
    )  # QoS1: broker drops it
    assert _mosquitto_pub(stack, a, "fleet/v1/dev-pub-a/upload", "own") == 0
    assert admin.expect("fleet/v1/dev-pub-a/upload", b"own") == []


# -- the admin's enumerated rights ------------------------------------------------------------


def test_admin_cannot_publish_as_a_device_or_a_label_source(
    stack: Stack, clients: list[Client]
) -> None:
    """The sidecar's identity has only the rights the sidecar uses (no fleet/# readwrite).

    (Like every client it matches the device patterns, e.g. it may read the OTA tree.)
    """
    observer = _observer(stack, clients)
    admin = _connected(stack, clients, stack.admin)
    for topic in (
        "fleet/v1/dev-x/upload",
        "fleet/v1/dev-x/events",
        "fleet/v1/dev-x/cert/request",
        "fleet/v1/labels/city-labels",
        "fleet/v1/enroll/0123456789abcdef/request",
    ):
        assert admin.publish(topic, b"forged").getName() == "Not authorized", topic
    assert not admin.publish("fleet/v1/dev-x/ack", b"ack").is_failure
    assert observer.expect("fleet/v1/dev-x/ack", b"ack") == []


# -- label sources ------------------------------------------------------------------------------


def _labels_reader(stack: Stack, clients: list[Client]) -> Client:
    """The sidecar's identity on its shared label subscription."""
    admin = _connected(stack, clients, stack.admin)
    assert not admin.subscribe("$share/ingest/fleet/v1/labels/+").is_failure
    return admin


def test_label_source_publishes_its_own_labels_and_the_sidecar_receives_them(
    stack: Stack, clients: list[Client]
) -> None:
    admin = _labels_reader(stack, clients)
    assert _mosquitto_pub(stack, stack.source, "fleet/v1/labels/city-labels", "labels-1") == 0
    assert admin.expect("fleet/v1/labels/city-labels", b"labels-1") == []


def test_label_source_cannot_publish_as_another_source_or_a_device(
    stack: Stack, clients: list[Client]
) -> None:
    observer = _observer(stack, clients)
    stack.ca.issue_client("dev-labelled")
    source = _connected(stack, clients, stack.source)
    for topic in (
        "fleet/v1/labels/reviewer-1",
        "fleet/v1/labels/reviewer-1/result",
        "fleet/v1/labels/city-labels/result",
        "fleet/v1/dev-labelled/upload",
        "fleet/v1/dev-labelled/events",
        "fleet/v1/dev-labelled/ota/status",
        "fleet/v1/ota/stable/targets.json",
    ):
        assert source.publish(topic, b"forged").getName() == "Not authorized", topic
    assert _mosquitto_pub(stack, stack.source, "fleet/v1/labels/reviewer-1", "forged") == 0
    assert not source.publish("fleet/v1/labels/city-labels", b"own").is_failure
    assert observer.expect("fleet/v1/labels/city-labels", b"own") == []


def test_device_cannot_publish_labels(stack: Stack, clients: list[Client]) -> None:
    observer = _observer(stack, clients)
    pair = stack.ca.issue_client("dev-labeller")
    device = _connected(stack, clients, pair)
    for topic in ("fleet/v1/labels/dev-labeller", "fleet/v1/labels/city-labels"):
        assert device.publish(topic, b"forged").getName() == "Not authorized", topic
        assert _mosquitto_pub(stack, pair, topic, "forged") == 0  # accepted, then dropped
    assert not device.publish("fleet/v1/dev-labeller/events", b"own").is_failure
    assert observer.expect("fleet/v1/dev-labeller/events", b"own") == []


def test_label_source_reads_only_its_own_result(stack: Stack, clients: list[Client]) -> None:
    sub = _mosquitto_sub(
        stack,
        stack.source,
        [
            "fleet/v1/labels/reviewer-1/result",
            "fleet/v1/labels/reviewer-1",
            "fleet/v1/dev-any/ack",
            "fleet/v1/labels/city-labels/result",
        ],
        1,
    )
    admin = _connected(stack, clients, stack.admin)
    other = _connected(stack, clients, stack.other_source)
    deadline = time.monotonic() + 10
    while sub.poll() is None and time.monotonic() < deadline:  # until the subscription is live
        assert not admin.publish("fleet/v1/labels/reviewer-1/result", b"for-other").is_failure
        assert not other.publish("fleet/v1/labels/reviewer-1", b"other-labels").is_failure
        assert not admin.publish("fleet/v1/dev-any/ack", b"an-ack").is_failure
        assert not admin.publish("fleet/v1/labels/city-labels/result", b"for-me").is_failure
        time.sleep(0.3)
    out, _ = sub.communicate(timeout=10)
    assert sub.returncode == 0
    assert out.strip() == b"fleet/v1/labels/city-labels/result for-me"
