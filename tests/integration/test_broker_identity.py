"""The broker binds the MQTT client id to the certificate (issue 9), real Mosquitto.

On the device listener the client id is the certificate's CN (``use_username_as_clientid``):
a device connecting with another device's client id no longer takes over that device's
session. The sidecar's certificate comes from its own service CA and only the service
listener accepts it; there client ids are free (several ingest workers, and the session
takeover ``end_session`` uses to close a revoked device's session). A device certificate
cannot reach the service listener.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from devstack.pki import CertPair
from devstack.stack import DevStack
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink, TransportError
from tests.integration.test_broker_mtls import Client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with DevStack(tmp_path_factory.mktemp("broker-identity"), n_devices=2) as s:
        yield s


def _link(endpoint: MqttEndpoint, client_id: str) -> MqttLink:
    link = MqttLink(endpoint, client_id, lambda _t, _p: None)
    link.start(wait_s=10)
    return link


def _stays_connected(link: MqttLink, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not link.connected:
            return False
        time.sleep(0.05)
    return True


def test_a_device_cannot_kick_another_device_off_by_using_its_client_id(stack: DevStack) -> None:
    victim, attacker = stack.devices
    kept = _link(stack.endpoint(victim.cert), victim.device_id)
    try:
        rogue = _link(stack.endpoint(attacker.cert), victim.device_id)  # the victim's id
        try:
            # before issue 9 the broker closed the victim's session at once, every time
            assert _stays_connected(kept, 3.0)
            assert rogue.connected  # the attacker is connected, as itself
        finally:
            rogue.stop()
    finally:
        kept.stop()


def test_a_device_certificate_is_refused_on_the_service_listener(stack: DevStack) -> None:
    assert stack.broker.service_port is not None
    dev = stack.devices[0]
    ep = stack.endpoint(dev.cert)
    service = MqttEndpoint(
        ep.host, stack.broker.service_port, ep.ca_cert, ep.client_cert, ep.client_key
    )
    link = MqttLink(service, "cloud-sidecar-ingest-1", lambda _t, _p: None)
    with pytest.raises(TransportError):
        link.start(wait_s=3)
    link.stop()


def test_two_sidecar_workers_share_the_service_identity_and_can_close_a_device_session(
    stack: DevStack,
) -> None:
    a = _link(stack.endpoint(stack.cloud_cert), "cloud-sidecar-ingest-1")
    b = _link(stack.endpoint(stack.cloud_cert), "cloud-sidecar-ingest-2")
    dev = stack.devices[1]
    device = _link(stack.endpoint(dev.cert), dev.device_id)
    try:
        assert _stays_connected(a, 1.0) and b.connected  # free client ids there
        takeover = _link(stack.endpoint(stack.cloud_cert), dev.device_id)  # end_session's way
        try:
            deadline, saw_down = time.monotonic() + 5, False
            while not saw_down and time.monotonic() < deadline:
                saw_down = not device.connected
                time.sleep(0.01)
            assert saw_down  # the device's session was taken over (it reconnects on its own)
        finally:
            takeover.stop()
    finally:
        for link in (a, b, device):
            link.stop()


OTA_TOPICS = (
    "fleet/v1/ota/stable/targets.json",  # single-key metadata (ADR 0016 before TUF)
    "fleet/v1/ota/stable/metadata/timestamp.json",  # TUF metadata
    "fleet/v1/ota/stable/artifacts/adapter-7.bin",  # a target
)


def _service_client(stack: DevStack, pair: CertPair) -> Client:
    assert stack.broker.service_port is not None
    service = dataclasses.replace(stack.broker, port=stack.broker.service_port)
    client = Client(service, pair, stack.ca.cert_path)
    assert client.connect(), f"refused on the service listener: {client.connack}"
    return client


def test_the_serve_identity_is_refused_writing_the_ota_tree_and_the_ota_publisher_may(
    stack: DevStack,
) -> None:
    """Issue 9 / ADR 0018: serve and the OTA publisher were one broker identity, so
    serve (on every ingest worker) could rewrite the OTA tree. Now only the publisher's
    CN may, and it may do nothing else."""
    serve = _service_client(stack, stack.cloud_cert)
    publisher = _service_client(stack, stack.ota_cert)
    try:
        for topic in OTA_TOPICS:
            assert serve.publish(topic, b"forged", retain=True).getName() == "Not authorized"
            assert not publisher.publish(topic, b"signed", retain=True).is_failure, topic
            assert not publisher.publish(topic, b"", retain=True).is_failure  # clear it
        for topic in ("fleet/v1/pi-00/ack", "fleet/v1/pi-00/cert/response"):
            assert publisher.publish(topic, b"x").getName() == "Not authorized", topic
        assert not serve.publish("fleet/v1/pi-00/ack", b"x").is_failure  # serve's own rights
    finally:
        serve.close()
        publisher.close()
