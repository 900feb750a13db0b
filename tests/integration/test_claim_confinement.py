"""The shared claim certificate can do nothing but enroll; device certificates cannot enroll.

A real DevStack broker (device listener trusting the HSM fleet CA, enrollment listener
trusting only the claim CA) and the real ``mosquitto_pub`` / ``mosquitto_sub`` clients
with the stack's real certificates. An observer (a test-only identity that may read
every topic) watches ``fleet/#`` on the device listener and the admin (``cloud-sidecar``
certificate) publishes; every "not delivered" assertion is ordered behind a message
that *is* delivered (QoS 1: the broker has handled a publish before ``mosquitto_pub``
exits), so none of them depends on a timeout.
"""

from __future__ import annotations

import queue
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.pki import CertPair
from devstack.procs import require_tool
from devstack.stack import DevStack
from fleet_protocol import topics
from fleet_protocol.io.mqtt import MqttLink

pytestmark = pytest.mark.integration

WAIT_S = 20.0
OBSERVER = "test-observer"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    require_tool("mosquitto_pub")
    require_tool("mosquitto_sub")
    with pytest.MonkeyPatch.context() as mp:  # DevStack sets SOFTHSM2_CONF
        mp.delenv("SOFTHSM2_CONF", raising=False)
        with DevStack(tmp_path_factory.mktemp("confine"), n_devices=0, observers=(OBSERVER,)) as s:
            yield s


class Admin:
    """The cloud's identity on the device listener (publishes), and an observer of ``fleet/#``."""

    def __init__(self, stack: DevStack) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        tag = uuid.uuid4().hex[:8]
        self.watch = MqttLink(
            stack.endpoint(stack.observer_certs[OBSERVER]),
            f"observer-{tag}",
            lambda t, p: self.got.put((t, p)),
        )
        self.watch.subscribe("fleet/#", 1)
        self.watch.start(wait_s=WAIT_S)
        self.link = MqttLink(stack.endpoint(stack.cloud_cert), f"admin-{tag}", lambda t, p: None)
        self.link.start(wait_s=WAIT_S)
        marker = topics.ack("confine-marker")
        self.until(marker, self.publish(marker))

    def publish(self, topic: str, retain: bool = False) -> bytes:
        payload = uuid.uuid4().hex.encode()
        assert self.link.publish(topic, payload, qos=1, retain=retain, timeout_s=WAIT_S)
        return payload

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message received up to and including (topic, payload)."""
        seen: list[tuple[str, bytes]] = []
        while True:
            msg = self.got.get(timeout=WAIT_S)
            seen.append(msg)
            if msg == (topic, payload):
                return seen


@pytest.fixture
def admin(stack: DevStack) -> Iterator[Admin]:
    a = Admin(stack)
    try:
        yield a
    finally:
        a.link.stop()
        a.watch.stop()


def _tls_args(stack: DevStack, pair: CertPair, port: int | None) -> list[str]:
    assert port is not None
    return [
        "-h", "127.0.0.1", "-p", str(port), "--cafile", str(stack.ca.cert_path),
        "--cert", str(pair.cert), "--key", str(pair.key),
    ]  # fmt: skip


def _pub(stack: DevStack, pair: CertPair, port: int | None, client_id: str, topic: str) -> int:
    argv = ["mosquitto_pub", *_tls_args(stack, pair, port), "-i", client_id, "-q", "1"]
    argv += ["-t", topic, "-m", "probe"]
    return subprocess.run(argv, capture_output=True, timeout=WAIT_S, check=False).returncode


def _claim_id() -> str:
    return uuid.uuid4().hex[:16]


def test_claim_certificate_is_refused_by_the_device_listener(stack: DevStack) -> None:
    cid = _claim_id()
    topic = f"fleet/v1/enroll/{cid}/request"
    assert _pub(stack, stack.claim_cert, stack.broker.port, cid, topic) != 0


def test_device_certificate_is_refused_by_the_enrollment_listener(stack: DevStack) -> None:
    device = stack.ca.issue_client("confine-dev")
    topic = "fleet/v1/enroll/confine-dev/request"
    assert _pub(stack, device, stack.broker.enroll_port, "confine-dev", topic) != 0
    # the same certificate works on the device listener (so the refusal is the listener's)
    assert _pub(stack, device, stack.broker.port, "confine-dev", "fleet/v1/confine-dev/events") == 0


def test_claim_reaches_its_own_enroll_request_topic(stack: DevStack, admin: Admin) -> None:
    cid = _claim_id()
    topic = f"fleet/v1/enroll/{cid}/request"
    assert _pub(stack, stack.claim_cert, stack.broker.enroll_port, cid, topic) == 0
    assert admin.until(topic, b"probe")[-1] == (topic, b"probe")


def test_claim_cannot_publish_an_upload_status_or_another_claims_request(
    stack: DevStack, admin: Admin
) -> None:
    cid = _claim_id()
    denied = [
        "fleet/v1/pi-00/upload",
        "fleet/v1/claim/upload",  # its own CN's subtree
        "fleet/v1/claim/events",
        f"fleet/v1/enroll/{_claim_id()}/request",  # another claim id than its client id
        "fleet/v1/ota/stable/manifest",
        f"fleet/v1/enroll/{cid}/response",  # answering itself
    ]
    port = stack.broker.enroll_port
    for topic in denied:
        assert _pub(stack, stack.claim_cert, port, cid, topic) == 0  # accepted, then dropped
    allowed = f"fleet/v1/enroll/{cid}/request"
    assert _pub(stack, stack.claim_cert, port, cid, allowed) == 0
    seen = {t for t, _ in admin.until(allowed, b"probe")}
    assert seen.isdisjoint(denied)


def test_claim_cannot_read_the_ota_tree_or_other_claims_responses(
    stack: DevStack, admin: Admin
) -> None:
    cid, other = _claim_id(), _claim_id()
    ota = "fleet/v1/ota/stable/manifest"
    mine = f"fleet/v1/enroll/{cid}/response"
    admin.publish(ota, retain=True)
    admin.publish(f"fleet/v1/enroll/{other}/response", retain=True)
    admin.publish("fleet/v1/pi-00/ack", retain=True)
    own = admin.publish(mine, retain=True)
    # retained messages are sent per filter in subscription order: the forbidden ones
    # come first, so the first message delivered is the claim's own response only if
    # none of the others is readable
    argv = ["mosquitto_sub", *_tls_args(stack, stack.claim_cert, stack.broker.enroll_port)]
    argv += ["-i", cid, "-v", "-C", "1", "-W", str(int(WAIT_S))]
    for topic in ("fleet/v1/ota/#", f"fleet/v1/enroll/{other}/response", "fleet/#", mine):
        argv += ["-t", topic]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S + 5, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{mine} {own.decode()}"
    # clean up the retained messages for other tests on this broker
    for topic in (ota, f"fleet/v1/enroll/{other}/response", "fleet/v1/pi-00/ack", mine):
        assert admin.link.publish(topic, b"", qos=1, retain=True, timeout_s=WAIT_S)


def test_enrollment_listener_acl_names_only_the_enroll_topics(stack: DevStack) -> None:
    acl = Path(stack.broker.workdir / "acl-enroll").read_text().splitlines()
    rules = [line for line in acl if line and not line.startswith("#")]
    assert rules == [
        "pattern write fleet/v1/enroll/%c/request",
        "pattern read fleet/v1/enroll/%c/response",
    ]
