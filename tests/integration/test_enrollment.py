"""Enrollment and renewal through the real broker (mTLS, ACL), real TPMs (swtpm) and the
sidecar serving in this process (SoftHSM, store, audit).

A device with only a one-time claim enrolls over the shared claim certificate, gets a
short-lived certificate for a TLS key kept encrypted under its TPM-sealed key, and
connects with it; reused, misbound or badly signed claims are refused, counted and
audited; renewal over the device's own session gives a new key and certificate and the
link reconnects with them.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_sidecar.fleet import FleetService
from devstack.stack import DeviceSlot
from edge_daemon.enroll import (
    IdentityStore,
    Renewer,
    TlsIdentity,
    enroll_device,
    reenroll_device,
)
from edge_daemon.errors import EnrollmentError
from edge_daemon.keys.tpm import TpmKeyStore
from fleet_protocol import enroll
from fleet_protocol import topics as enroll_topics
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink

from .conftest import Cloud

pytestmark = pytest.mark.integration
TIMEOUT = 20.0


@dataclass
class Enrolling:
    slot: DeviceSlot
    keys: TpmKeyStore
    store: IdentityStore


def fleet_of(cloud: Cloud) -> FleetService:
    assert cloud.app.fleet is not None, "cloud_config must carry a fleet section"
    return cloud.app.fleet


def claim_endpoint(cloud: Cloud) -> MqttEndpoint:
    s = cloud.stack
    port = s.broker.enroll_port  # only the enrollment listener accepts the claim cert
    assert port is not None
    return MqttEndpoint("127.0.0.1", port, s.ca.cert_path, s.claim_cert.cert, s.claim_cert.key)


@contextmanager
def new_device(cloud: Cloud, device_id: str) -> Iterator[Enrolling]:
    slot = cloud.stack.add_device(device_id)
    with TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys") as keys:
        yield Enrolling(slot, keys, IdentityStore(slot.state_dir / "tls", keys.storage_key()))


def do_enroll(
    cloud: Cloud, dev: Enrolling, claim: enroll.Claim, sign: object = None, tpm: object = True
) -> TlsIdentity:
    """Enroll ``dev``; its TPM answers the credential-activation challenge unless ``tpm``
    is given (None: no TPM at all; another object: a stand-in)."""
    return enroll_device(
        dev.slot.device_id,
        claim,
        sign or dev.keys.sign_digest,  # type: ignore[arg-type]
        dev.keys.signing_public_key_pem(),
        dev.store,
        claim_endpoint(cloud),
        timeout_s=TIMEOUT,
        tpm=dev.keys if tpm is True else tpm,  # type: ignore[arg-type]
    )


@contextmanager
def connected(cloud: Cloud, device_id: str, identity: TlsIdentity) -> Iterator[MqttLink]:
    s = cloud.stack
    endpoint = identity.endpoint("127.0.0.1", s.broker.port, s.ca.cert_path, 30)
    link = MqttLink(endpoint, client_id=device_id, on_message=lambda _t, _p: None)
    link.start(wait_s=TIMEOUT)
    try:
        yield link
    finally:
        link.stop()


def audit_kinds(cloud: Cloud, subject: str) -> list[str]:
    lines = (cloud.app.cfg.data_dir / "audit.jsonl").read_text().splitlines()
    return [e["kind"] for e in map(json.loads, lines) if e["subject"] == subject]


def rejected(cloud: Cloud, op: str, reason: str) -> int:
    return cloud.app.metrics.get("fleet_rejected_total", op=op, reason=reason)


def test_device_enrolls_with_its_claim_and_connects_with_the_issued_certificate(
    cloud: Cloud,
) -> None:
    fleet = fleet_of(cloud)
    with new_device(cloud, "enr-ok") as dev:
        identity = do_enroll(cloud, dev, fleet.create_claim("enr-ok"))

        pem = identity.path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "enr-ok"
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime.total_seconds() <= fleet.ca.cert_valid.total_seconds() + 600
        # the TLS key is at rest only encrypted, and the password comes from the TPM
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem and b"BEGIN PRIVATE KEY" not in pem
        with pytest.raises((TypeError, ValueError)):
            serialization.load_pem_private_key(pem, None)

        record = cloud.app.store.device("enr-ok")
        assert record is not None and record.status == "active"
        assert record.key_id == dev.keys.signing_key_id()  # the TPM identity is registered
        assert cloud.app.store.certificates("enr-ok")[0][0] == format(cert.serial_number, "x")
        assert "fleet.enrolled" in audit_kinds(cloud, "enr-ok")

        with connected(cloud, "enr-ok", identity) as link:
            assert link.connected


def test_a_used_claim_is_refused_counted_and_audited(cloud: Cloud) -> None:
    fleet = fleet_of(cloud)
    with new_device(cloud, "enr-reuse") as dev:
        claim = fleet.create_claim("enr-reuse")
        do_enroll(cloud, dev, claim)
        before = rejected(cloud, "enroll", "claim_used")
        with pytest.raises(EnrollmentError) as e:
            do_enroll(cloud, dev, claim)
    assert e.value.reason == "claim_used"
    assert rejected(cloud, "enroll", "claim_used") == before + 1
    assert "fleet.enroll_rejected" in audit_kinds(cloud, "enr-reuse")


def test_a_claim_for_another_device_id_is_refused(cloud: Cloud) -> None:
    claim = fleet_of(cloud).create_claim("enr-someone-else")
    with new_device(cloud, "enr-thief") as dev, pytest.raises(EnrollmentError) as e:
        do_enroll(cloud, dev, claim)
    assert e.value.reason == "claim_device_mismatch"
    assert cloud.app.store.device("enr-thief") is None
    assert rejected(cloud, "enroll", "claim_device_mismatch") >= 1


def test_a_wrong_token_or_unknown_claim_is_refused_without_burning_the_claim(
    cloud: Cloud,
) -> None:
    fleet = fleet_of(cloud)
    claim = fleet.create_claim("enr-guess")
    with new_device(cloud, "enr-guess") as dev:
        with pytest.raises(EnrollmentError) as e:
            do_enroll(cloud, dev, enroll.Claim(claim.claim_id, enroll.Claim.new().token))
        assert e.value.reason == "bad_token"
        with pytest.raises(EnrollmentError) as e:
            do_enroll(cloud, dev, enroll.Claim.new())
        assert e.value.reason == "unknown_claim"
        assert do_enroll(cloud, dev, claim).path.exists()  # the real claim still works


def test_another_claim_holder_can_neither_read_nor_disturb_an_enrollment(cloud: Cloud) -> None:
    """Issue 9: every claim holder shares the claim certificate; with client id = claim
    id, a second holder who knew a claim id took the session over and read the answers.
    Now each request travels on its own channel (HMAC of the claim's token and the
    request's nonce), the only client id the listener lets read its responses."""
    fleet = fleet_of(cloud)
    claim = fleet.create_claim("enr-bound")
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    rogue = MqttLink(claim_endpoint(cloud), client_id=claim.claim_id,
                     on_message=lambda t, p: seen.put((t, p)))  # fmt: skip
    rogue.subscribe(enroll_topics.enroll_response(claim.claim_id), 1)
    key = ec.generate_private_key(ec.SECP256R1())
    forged = enroll.EnrollRequest(  # the rogue's own request for the claim, without its token
        device_id="enr-bound", claim_id=claim.claim_id, token=enroll.Claim.new().token,
        csr=enroll.make_csr(ec.generate_private_key(ec.SECP256R1()), "enr-bound"),
        identity_key=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        created_at_ms=int(time.time() * 1000), nonce=enroll.new_nonce(),
    ).signed(lambda d: key.sign(d, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))  # fmt: skip
    rogue.start(wait_s=TIMEOUT)
    try:
        before = rejected(cloud, "enroll", "channel_mismatch")
        rogue.publish(enroll_topics.enroll_request(claim.claim_id), forged.to_bytes(), 1)
        with new_device(cloud, "enr-bound") as dev:
            identity = do_enroll(cloud, dev, claim)  # undisturbed
        assert identity.path.exists()
        assert rogue.connected  # nobody took the rogue's session over either
        time.sleep(1.0)
        assert seen.empty()  # no challenge, certificate or refusal reached the rogue
        assert rejected(cloud, "enroll", "channel_mismatch") == before + 1
    finally:
        rogue.stop()


def test_a_request_not_signed_by_the_presented_tpm_key_is_refused(cloud: Cloud) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())

    def sign(digest: bytes) -> bytes:
        return impostor.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    claim = fleet_of(cloud).create_claim("enr-forged")
    with new_device(cloud, "enr-forged") as dev, pytest.raises(EnrollmentError) as e:
        do_enroll(cloud, dev, claim, sign)
    assert e.value.reason == "bad_signature"
    assert rejected(cloud, "enroll", "bad_signature") >= 1


def test_renewal_gives_a_new_key_and_certificate_and_the_link_reconnects(cloud: Cloud) -> None:
    fleet = fleet_of(cloud)
    with new_device(cloud, "enr-renew") as dev:
        first = do_enroll(cloud, dev, fleet.create_claim("enr-renew"))
        old_pem = first.path.read_bytes()
        with connected(cloud, "enr-renew", first) as link:
            renewer = Renewer(
                "enr-renew",
                dev.keys.sign_digest,
                dev.keys.signing_key_id(),
                dev.store,
                link,
                cloud.stack.ca.cert_path.read_bytes(),
                timeout_s=TIMEOUT,
            )
            link.subscribe(renewer.response_topic, 1)
            link._on_message = lambda _t, p: renewer.on_message(p)
            time.sleep(0.5)  # the SUBACK for the response topic
            second = renewer.renew_once()
            deadline = time.monotonic() + TIMEOUT
            while not link.connected and time.monotonic() < deadline:
                time.sleep(0.1)
            assert link.connected, "the link did not reconnect with the renewed certificate"
        new_pem = second.path.read_bytes()
        assert new_pem != old_pem
        old, new = (x509.load_pem_x509_certificate(p) for p in (old_pem, new_pem))
        assert new.serial_number != old.serial_number
        assert new.public_key() != old.public_key()  # a new TLS key, not only a new cert
        assert len(cloud.app.store.certificates("enr-renew")) == 2
        assert "fleet.renewed" in audit_kinds(cloud, "enr-renew")
        with connected(cloud, "enr-renew", second) as again:
            assert again.connected


def test_renewal_signed_by_another_key_is_refused(cloud: Cloud) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())

    def sign(digest: bytes) -> bytes:
        return impostor.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    with new_device(cloud, "enr-renew-bad") as dev:
        identity = do_enroll(cloud, dev, fleet_of(cloud).create_claim("enr-renew-bad"))
        installed = identity.path.read_bytes()
        with connected(cloud, "enr-renew-bad", identity) as link:
            renewer = Renewer(
                "enr-renew-bad",
                sign,
                dev.keys.signing_key_id(),
                dev.store,
                link,
                cloud.stack.ca.cert_path.read_bytes(),
                timeout_s=TIMEOUT,
            )
            link.subscribe(renewer.response_topic, 1)
            link._on_message = lambda _t, p: renewer.on_message(p)
            time.sleep(0.5)
            with pytest.raises(EnrollmentError) as e:
                renewer.renew_once()
    assert e.value.reason == "bad_signature"
    assert identity.path.read_bytes() == installed  # the current identity is kept
    assert len(cloud.app.store.certificates("enr-renew-bad")) == 1
    assert "fleet.renew_rejected" in audit_kinds(cloud, "enr-renew-bad")


# -- offline past the certificate's lifetime (docs/adr/0017) ------------------------------


@contextmanager
def short_certificates(cloud: Cloud, seconds: float) -> Iterator[None]:
    ca = fleet_of(cloud).ca
    saved, ca.cert_valid = ca.cert_valid, dt.timedelta(seconds=seconds)
    try:
        yield
    finally:
        ca.cert_valid = saved


def do_reenroll(cloud: Cloud, dev: Enrolling, sign: object = None) -> TlsIdentity:
    return reenroll_device(
        dev.slot.device_id,
        sign or dev.keys.sign_digest,  # type: ignore[arg-type]
        dev.keys.signing_key_id(),
        dev.store,
        claim_endpoint(cloud),
        timeout_s=TIMEOUT,
    )


def test_a_device_whose_certificate_expired_offline_reenrolls_with_its_tpm_key(
    cloud: Cloud,
) -> None:
    fleet = fleet_of(cloud)
    with new_device(cloud, "enr-offline") as dev:
        with short_certificates(cloud, 3):
            first = do_enroll(cloud, dev, fleet.create_claim("enr-offline"))
        while not first.expired():
            time.sleep(0.2)
        s = cloud.stack
        link = MqttLink(
            first.endpoint("127.0.0.1", s.broker.port, s.ca.cert_path, 30),
            client_id="enr-offline",
            on_message=lambda _t, _p: None,
        )
        link.start(wait_s=0)  # the daemon's link keeps trying with the expired certificate
        try:
            time.sleep(2.0)
            assert not link.connected, "the broker accepted an expired certificate"
            renewer = Renewer(
                "enr-offline",
                dev.keys.sign_digest,
                dev.keys.signing_key_id(),
                dev.store,
                link,
                s.ca.cert_path.read_bytes(),
                timeout_s=TIMEOUT,
                reenroll=lambda: do_reenroll(cloud, dev),  # what make_renewer wires
            )
            second = renewer.reenroll_once()  # no claim, no human: the TPM key
            deadline = time.monotonic() + TIMEOUT
            while not link.connected and time.monotonic() < deadline:
                time.sleep(0.1)
            assert link.connected, "the link did not come back with the new certificate"
        finally:
            link.stop()
    assert not second.expired() and renewer.reenrolled == 1
    assert len(cloud.app.store.certificates("enr-offline")) == 2
    assert "fleet.reenrolled" in audit_kinds(cloud, "enr-offline")
    assert cloud.app.metrics.get("fleet_reenrolled_total") >= 1


def test_reenrollment_signed_by_another_key_or_for_a_revoked_device_is_refused(
    cloud: Cloud,
) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())

    def sign(digest: bytes) -> bytes:
        return impostor.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    fleet = fleet_of(cloud)
    with new_device(cloud, "enr-reenroll-bad") as dev:
        do_enroll(cloud, dev, fleet.create_claim("enr-reenroll-bad"))
        with pytest.raises(EnrollmentError) as e:
            do_reenroll(cloud, dev, sign)
        assert e.value.reason == "bad_signature"
        fleet.revoke("enr-reenroll-bad")
        with pytest.raises(EnrollmentError) as e:
            do_reenroll(cloud, dev)
        assert e.value.reason == "revoked_device"
    with new_device(cloud, "enr-never-enrolled") as stranger, pytest.raises(EnrollmentError) as e:
        do_reenroll(cloud, stranger)
    assert e.value.reason == "unknown_device"
    assert rejected(cloud, "reenroll", "revoked_device") >= 1
    assert len(cloud.app.store.certificates("enr-reenroll-bad")) == 1
