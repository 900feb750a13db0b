"""Fleet identity against insiders (issue 9): claims bound by a MAC, reserved identities,
check before signing, revoke serialised against renewal, no re-activation by claim.

Pure logic: the file CA kept for tests, a software HMAC in place of the HSM's
``claim-mac`` secret, a temp SQLite store. The same paths with SoftHSM, swtpm and the
broker are in tests/integration/test_insider_identity.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.fleet import FleetService, claim_record_hash
from cloud_sidecar.fleet_ca import FleetCA, file_ca_signer
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from devstack.pki import DevCA
from fleet_protocol import enroll, topics

MAC_KEY = b"k" * 32
REGION = "eu-central-1"


def _mac(data: bytes) -> bytes:
    return hmac.new(MAC_KEY, data, hashlib.sha256).digest()


class Fleet:
    def __init__(self, tmp: Path) -> None:
        DevCA.create(tmp / "ca")
        self.ca = FleetCA(file_ca_signer(tmp / "ca"), tmp / "ca" / "crl.pem", timedelta(days=7))
        self.store = Store(tmp / "store.sqlite3", REGION)
        self.metrics = Metrics()
        self.signed = 0
        issue = self.ca.issue

        def counting_issue(csr: x509.CertificateSigningRequest) -> x509.Certificate:
            self.signed += 1
            return issue(csr)

        self.ca.issue = counting_issue  # type: ignore[method-assign]
        self.svc = FleetService(
            self.store, AuditLog(tmp / "audit.jsonl", REGION), self.metrics, self.ca, claim_mac=_mac
        )


class Device:
    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.identity = ec.generate_private_key(ec.SECP256R1())
        self.tls = ec.generate_private_key(ec.SECP256R1())

    def sign(self, digest: bytes) -> bytes:
        return self.identity.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    def identity_pem(self) -> str:
        return (
            self.identity.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def enroll_request(self, claim: enroll.Claim) -> bytes:
        return (
            enroll.EnrollRequest(
                device_id=self.id,
                claim_id=claim.claim_id,
                token=claim.token,
                csr=enroll.make_csr(self.tls, self.id),
                identity_key=self.identity_pem(),
                created_at_ms=int(time.time() * 1000),
                nonce=enroll.new_nonce(),
            )
            .signed(self.sign)
            .to_bytes()
        )

    def renew_request(self) -> bytes:
        return (
            enroll.RenewRequest(
                device_id=self.id,
                kid=enroll.key_id(self.identity.public_key()),
                csr=enroll.make_csr(ec.generate_private_key(ec.SECP256R1()), self.id),
                created_at_ms=int(time.time() * 1000),
                nonce=enroll.new_nonce(),
            )
            .signed(self.sign)
            .to_bytes()
        )


def channel_of(payload: bytes) -> str:
    """The session channel a request must travel on (``enroll.session_channel``)."""
    req = enroll.EnrollRequest.from_bytes(payload)
    return enroll.session_channel(req.claim_id, req.token, req.nonce)


def _enroll(fleet: Fleet, dev: Device, claim: enroll.Claim) -> enroll.CertResponse:
    payload = dev.enroll_request(claim)
    reply = fleet.svc.handle(topics.enroll_request(channel_of(payload)), payload)
    assert reply is not None
    assert reply[0] == topics.enroll_response(channel_of(payload))
    return enroll.CertResponse.from_bytes(reply[1])


def test_a_request_off_its_session_channel_gets_no_answer_and_leaves_the_claim(
    tmp_path: Path,
) -> None:
    """Issue 9: the channel (topic and client id) is derived from the claim's token and
    the request's nonce; a request on any other channel (the claim id, as before, or a
    channel another holder picked) is answered nowhere and burns nothing."""
    fleet = Fleet(tmp_path)
    dev = Device("pi-chan")
    claim = fleet.svc.create_claim(dev.id)
    payload = dev.enroll_request(claim)
    for channel in (claim.claim_id, "0123456789abcdef"):
        assert fleet.svc.handle(topics.enroll_request(channel), payload) is None
    assert fleet.metrics.get("fleet_rejected_total", op="enroll", reason="channel_mismatch") == 2
    assert fleet.signed == 0
    assert _enroll(fleet, dev, claim).status == "issued"


def test_a_claim_written_into_the_store_by_an_insider_enrolls_nobody(tmp_path: Path) -> None:
    """Before issue 9 the store kept SHA-256(token): whoever could write it minted claims."""
    fleet = Fleet(tmp_path)
    forged = enroll.Claim.new()
    fleet.store.add_claim(
        forged.claim_id, "pi-07", enroll.token_hash(forged.token), int(time.time() * 1000) + 60_000
    )
    resp = _enroll(fleet, Device("pi-07"), forged)
    assert (resp.status, resp.reason) == ("rejected", "bad_token")
    assert fleet.signed == 0
    assert fleet.store.device("pi-07") is None


def test_an_operator_claim_is_a_mac_over_claim_device_and_token(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    claim = fleet.svc.create_claim("pi-08")
    assert _enroll(fleet, Device("pi-08"), claim).status == "issued"
    record = claim_record_hash(_mac, claim.claim_id, "pi-08", claim.token)
    assert record != enroll.token_hash(claim.token)


@pytest.mark.parametrize(
    "device_id", ["cloud-sidecar", "cloud-sidecar-ingest-1", "cloud-sidecar-rollback", "claim"]
)
def test_service_identities_are_reserved_for_claims_and_enrollment(
    tmp_path: Path, device_id: str
) -> None:
    fleet = Fleet(tmp_path)
    with pytest.raises(ConfigError, match="reserved"):
        fleet.svc.create_claim(device_id)
    claim = enroll.Claim.new()  # even a record with a valid MAC (an HSM-holding insider)
    fleet.store.add_claim(
        claim.claim_id,
        device_id,
        claim_record_hash(_mac, claim.claim_id, device_id, claim.token),
        int(time.time() * 1000) + 60_000,
    )
    resp = _enroll(fleet, Device(device_id), claim)
    assert (resp.status, resp.reason) == ("rejected", "reserved_device_id")


def test_a_refused_claim_is_refused_before_anything_is_signed(tmp_path: Path) -> None:
    """Before issue 9 the CA signed the certificate first, then looked at the claim."""
    fleet = Fleet(tmp_path)
    claim = fleet.svc.create_claim("pi-09")
    resp = _enroll(fleet, Device("pi-10"), claim)  # bound to another device
    assert (resp.status, resp.reason) == ("rejected", "claim_device_mismatch")
    wrong = enroll.Claim(claim.claim_id, enroll.Claim.new().token)
    assert _enroll(fleet, Device("pi-09"), wrong).reason == "bad_token"
    assert fleet.signed == 0
    assert _enroll(fleet, Device("pi-09"), claim).status == "issued"  # the claim was not burnt


def test_a_new_claim_never_reactivates_a_revoked_device(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    dev = Device("pi-11")
    assert _enroll(fleet, dev, fleet.svc.create_claim("pi-11")).status == "issued"
    fleet.svc.revoke("pi-11")
    resp = _enroll(fleet, Device("pi-11"), fleet.svc.create_claim("pi-11"))
    assert (resp.status, resp.reason) == ("rejected", "revoked_device")
    assert fleet.store.device("pi-11").status != "active"  # type: ignore[union-attr]


def test_a_renewal_racing_a_revocation_never_yields_a_certificate_missing_from_the_crl(
    tmp_path: Path,
) -> None:
    """Revoke lists serials under the lock issuance holds: every issued serial is listed."""
    fleet = Fleet(tmp_path)
    dev = Device("pi-12")
    assert _enroll(fleet, dev, fleet.svc.create_claim("pi-12")).status == "issued"
    in_sign, release = threading.Event(), threading.Event()
    issue = fleet.ca.issue

    def slow_issue(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        in_sign.set()
        release.wait(5)
        return issue(csr)

    fleet.ca.issue = slow_issue  # type: ignore[method-assign]
    replies: list[bytes] = []
    renewal = threading.Thread(
        target=lambda: replies.append(
            fleet.svc.handle(topics.cert_request("pi-12"), dev.renew_request())[1]  # type: ignore[index]
        )
    )
    renewal.start()
    assert in_sign.wait(5)
    revoked: list[list[str]] = []
    revoker = threading.Thread(target=lambda: revoked.append(fleet.svc.revoke("pi-12")))
    revoker.start()
    time.sleep(0.2)
    release.set()
    renewal.join(10)
    revoker.join(10)
    resp = enroll.CertResponse.from_bytes(replies[0])
    assert resp.status == "issued"  # it was in flight; revoke waited for it
    serial = format(x509.load_pem_x509_certificate(resp.cert.encode()).serial_number, "x")
    assert serial in revoked[0]
    crl = x509.load_pem_x509_crl(fleet.ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    after = fleet.svc.handle(topics.cert_request("pi-12"), dev.renew_request())
    assert after is not None
    assert enroll.CertResponse.from_bytes(after[1]).reason == "revoked_device"


def test_claim_records_differ_per_device_and_claim(tmp_path: Path) -> None:
    token = base64.urlsafe_b64encode(b"\0" * 32).rstrip(b"=").decode()
    a = claim_record_hash(_mac, "00" * 8, "pi-01", token)
    assert a != claim_record_hash(_mac, "00" * 8, "pi-02", token)
    assert a != claim_record_hash(_mac, "11" * 8, "pi-01", token)
