"""Revocation through the real broker: ``cloud-sidecar fleet revoke`` puts every certificate
of the device in the CRL, the broker reloads it (devstack's CRL hook), and the device is
refused at its next TLS handshake; a session opened before the revocation can no longer
upload (``revoked_device``) or renew.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from cryptography import x509

from edge_daemon.enroll import Renewer, TlsIdentity
from edge_daemon.errors import EnrollmentError
from fleet_protocol import batch, envelope, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.mqtt import MqttLink, TransportError
from fleet_protocol.messages import Ack

from .conftest import Cloud
from .test_enrollment import Enrolling, audit_kinds, do_enroll, fleet_of, new_device

pytestmark = pytest.mark.integration
TIMEOUT = 20.0
CLI = (sys.executable, "-m", "cloud_sidecar", "fleet")


def tls_alert(cloud: Cloud, identity: TlsIdentity, wait_s: float = 3.0) -> str:
    """The broker's TLS alert right after the handshake ('none' when it accepts us)."""
    s = cloud.stack
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca.cert_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(identity.path), str(identity.path), identity.password)
    try:
        with (
            socket.create_connection(("127.0.0.1", s.broker.port), TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(wait_s)
            data = tls.recv(4)
    except ssl.SSLError as e:
        return str(e.reason)
    except TimeoutError:
        return "none"
    return f"none; read {data!r}"


@contextmanager
def session(
    cloud: Cloud, dev: Enrolling, identity: TlsIdentity
) -> Iterator[tuple[MqttLink, queue.Queue[tuple[str, bytes]]]]:
    s = cloud.stack
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    endpoint = identity.endpoint("127.0.0.1", s.broker.port, s.ca.cert_path, 30)
    link = MqttLink(endpoint, dev.slot.device_id, lambda t, p: inbox.put((t, p)))
    link.subscribe(topics.ack(dev.slot.device_id), 1)
    link.subscribe(topics.cert_response(dev.slot.device_id), 1)
    link.start(wait_s=TIMEOUT)
    time.sleep(0.5)  # SUBACKs
    try:
        yield link, inbox
    finally:
        link.stop()


def upload(
    cloud: Cloud, dev: Enrolling, link: MqttLink, inbox: queue.Queue[tuple[str, bytes]], seq: int
) -> Ack:
    device = dev.slot.device_id
    meta = batch.SampleMeta(
        sample_id=os.urandom(16).hex(),
        captured_at_ms=1,
        stream_offset_s=0.0,
        predicted="horn",
        score=0.4,
        model_sha256="ab" * 32,
        reason="audit",
    )
    plain = batch.encode(batch.Batch(device, (meta,), np.zeros((1, N_BANDS, N_FRAMES), np.float16)))
    pem = cloud.unwrap_pem.read_bytes()
    sealed = envelope.seal(
        plain,
        device=device,
        batch_id=os.urandom(16).hex(),
        seq=seq,
        created_at_ms=int(time.time() * 1000),
        wrap_public_key_pem=pem,
        kid_wrap=key_id_from_pem(pem),
        kid_sig=dev.keys.signing_key_id(),
        sign_digest=dev.keys.sign_digest,
    )
    assert link.publish(topics.upload(device), sealed)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        topic, payload = inbox.get(timeout=TIMEOUT)
        if topic == topics.ack(device):
            return Ack.from_bytes(payload)
    raise AssertionError("no ack")


def disconnected(link: MqttLink, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while link.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    return not link.connected


def revoke_cli(cloud: Cloud, device: str) -> str:
    out = subprocess.run(
        [*CLI, "--config", str(cloud.config), "revoke", device],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_revoked_device_is_refused_at_its_next_handshake_and_its_session_closed(
    cloud: Cloud,
) -> None:
    with new_device(cloud, "rev-handshake") as dev:
        identity = do_enroll(cloud, dev, fleet_of(cloud).create_claim("rev-handshake"))
        assert tls_alert(cloud, identity) == "none"
        with session(cloud, dev, identity) as (open_link, _inbox):
            assert open_link.connected

            out = revoke_cli(cloud, "rev-handshake")
            assert "revoked rev-handshake" in out and "open session closed" in out

            assert tls_alert(cloud, identity) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
            assert disconnected(open_link), "the session opened before revocation lives on"
            time.sleep(2)  # the link's own reconnect attempts meet the new CRL
            assert disconnected(open_link, 0)
        s = cloud.stack
        link = MqttLink(
            identity.endpoint("127.0.0.1", s.broker.port, s.ca.cert_path, 30),
            "rev-handshake",
            lambda _t, _p: None,
        )
        with pytest.raises(TransportError):
            link.start(wait_s=3)
        link.stop()
    record = cloud.app.store.device("rev-handshake")
    assert record is not None and record.status == "revoked"
    assert "fleet.revoked" in audit_kinds(cloud, "rev-handshake")


def test_a_session_opened_before_revocation_can_neither_upload_nor_renew(cloud: Cloud) -> None:
    with new_device(cloud, "rev-session") as dev:
        identity = do_enroll(cloud, dev, fleet_of(cloud).create_claim("rev-session"))
        with session(cloud, dev, identity) as (link, inbox):
            assert upload(cloud, dev, link, inbox, seq=1).status == "stored"

            fleet_of(cloud).revoke("rev-session")

            ack = upload(cloud, dev, link, inbox, seq=2)
            assert (ack.status, ack.reason) == ("rejected", "revoked_device")
            renewer = Renewer(
                "rev-session",
                dev.keys.sign_digest,
                dev.keys.signing_key_id(),
                dev.store,
                link,
                cloud.stack.ca.cert_path.read_bytes(),
                timeout_s=TIMEOUT,
            )
            link._on_message = lambda _t, p: renewer.on_message(p)
            with pytest.raises(EnrollmentError) as e:
                renewer.renew_once()
            assert e.value.reason == "revoked_device"
    assert cloud.app.metrics.get("ingest_rejected_total", reason="revoked_device") >= 1


def test_revocation_lists_every_certificate_the_device_ever_had(cloud: Cloud) -> None:
    fleet = fleet_of(cloud)
    with new_device(cloud, "rev-all") as dev:
        first = do_enroll(cloud, dev, fleet.create_claim("rev-all"))
        first_pem = first.path.read_bytes()
        second = do_enroll(cloud, dev, fleet.create_claim("rev-all"))  # re-provisioned
        serials = fleet.revoke("rev-all")
        crl = x509.load_pem_x509_crl(cloud.stack.ca.crl_path.read_bytes())
        listed = {format(r.serial_number, "x") for r in crl}
        for pem in (first_pem, second.path.read_bytes()):
            serial = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
            assert serial in serials and serial in listed
        assert tls_alert(cloud, second) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
        assert fleet.revoke("rev-all") == serials  # idempotent: nothing new to list
