"""Fleet identity on the cloud side: claims, enrollment, renewal, revocation, the fleet CA.

Owns: issuing one-time claims, answering enrollment, renewal and re-enrollment requests
(verify the claim or the registered TPM identity, verify the CSR, sign a short-lived
client certificate), revoking a device (store + CRL + broker reload hook). The CA
itself (``FleetCA``, the CRL, the reload hook) is cloud_sidecar/fleet_ca.py.

Invariants:
- a certificate is issued only after every check passed: request parsed within its
  caps, TPM signature valid (enrollment: by the key it registers; renewal: by the key
  registered for the broker-authenticated device; re-enrollment of a device whose
  certificate expired while it was offline, over the claim listener: by the key
  registered for the active device it names, docs/adr/0017), CSR for EC P-256 with subject
  exactly ``CN=<device id>``, and for enrollment a claim that is known, unused,
  unexpired and bound to that device id (consumed last, so a malformed request never
  burns a claim; the certificate is signed just before, and discarded when the claim is
  refused, so an HSM outage never burns one either: no answer, the device resends);
- every certificate is ``clientAuth`` only, CN = device id, valid ``cert_valid_s``,
  and its serial is stored before the response is sent, so ``revoke`` can list it;
- every rejection is logged, counted (``fleet_rejected_total{op,reason}``), audited,
  and answered with a ``CertResponse`` when the request named a reply address;
- the CA's private key is used only through ``CaSigner``: ``HsmCaSigner``
  (cloud_sidecar/ca.py, the key never leaves the HSM) unless the config asks for the
  file key kept for tests (docs/adr/0007-device-identity-and-enrollment.md);
  the CRL keeps DevCA's layout (``<ca_dir>/crl.pem``, CRL number strictly increasing).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloud_sidecar import attest
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.broker_acl import admin_identity, ota_publisher_identity
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_hsm, open_link
from cloud_sidecar.errors import ConfigError, HsmError
from cloud_sidecar.fleet_ca import FleetCA, file_ca_signer, read_capped, run_crl_hook
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store_api import EnrollmentRecords
from cloud_sidecar.trust import check_hook
from fleet_protocol import enroll, topics
from fleet_protocol.certs import CaSigner
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError
from fleet_protocol.io.mqtt import TransportError

log = logging.getLogger(__name__)

# topic levels beside the devices', the shared claim certificate's CN, and the service
# identities: the sidecar's default admin CN and broker client ids (cloud-sidecar-*)
RESERVED_DEVICE_IDS = topics.RESERVED_DEVICE_IDS | {"claim", "cloud-sidecar", "admin", "broker"}
RESERVED_PREFIXES = ("cloud-sidecar",)
CLAIM_TAG = b"sovereign-edge claim record v2\x00"

Reply = tuple[str, bytes]


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- enrollment, renewal, revocation -----------------------------------------------------


@dataclass(frozen=True)
class FleetPolicy:
    claim_ttl_s: int = 7 * 24 * 3600
    max_clock_skew_s: int = 600
    reserved_ids: frozenset[str] = RESERVED_DEVICE_IDS

    def is_reserved(self, device_id: str) -> bool:
        """A topic level, a service identity (admin, label source, claim) or its prefix."""
        return device_id in self.reserved_ids or device_id.startswith(RESERVED_PREFIXES)


ClaimMac = Callable[[bytes], bytes]


def claim_record_hash(mac: ClaimMac, claim_id: str, device_id: str, token: str) -> str:
    """What the store keeps for a claim: an HSM MAC over the claim id, the device it is
    bound to and the token's hash. Without the HSM nobody can write a record that a
    token will match, so write access to the store does not mint claims."""
    body = f"{claim_id}\x00{device_id}\x00{enroll.token_hash(token)}".encode()
    return mac(CLAIM_TAG + body).hex()


class FleetService:
    """Answers enrollment and renewal requests; issues claims; revokes devices."""

    def __init__(
        self,
        store: EnrollmentRecords,
        audit: AuditLog,
        metrics: Metrics,
        ca: FleetCA,
        policy: FleetPolicy = FleetPolicy(),
        on_crl_changed: Callable[[Path], None] = lambda _p: None,
        *,
        claim_mac: ClaimMac,
        ek_issuers: Sequence[x509.Certificate] = (),
    ) -> None:
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.ca = ca
        self.policy = policy
        self._on_crl_changed = on_crl_changed
        self._claim_mac = claim_mac
        self._ek_issuers = tuple(ek_issuers)  # empty: no proof of TPM residence asked
        self._pending = attest.PendingChallenges()
        # revoke vs. issue: a certificate is issued and recorded, or the device is revoked
        # with every serial listed, never a certificate missing from the CRL
        self._issue_lock = threading.Lock()

    # -- operator commands ------------------------------------------------------------

    def create_claim(self, device_id: str) -> enroll.Claim:
        """A one-time claim bound to ``device_id``; only its token's hash is stored."""
        try:
            topics.check_device_id(device_id)
        except ProtocolError as e:
            raise ConfigError(str(e)) from e
        if self.policy.is_reserved(device_id):
            raise ConfigError(f"{device_id!r} is reserved and cannot be a device id")
        claim = enroll.Claim.new()
        expires = int(time.time() * 1000) + self.policy.claim_ttl_s * 1000
        try:
            record = claim_record_hash(self._claim_mac, claim.claim_id, device_id, claim.token)
        except HsmError as e:
            raise ConfigError(f"the HSM cannot bind the claim: {e}") from e
        self.store.add_claim(claim.claim_id, device_id, record, expires)
        self.audit.append(
            "fleet.claim_issued", device_id, claim_id=claim.claim_id, expires_ms=expires
        )
        return claim

    def revoke(self, device_id: str) -> list[str]:
        """Revoke every certificate of the device, refuse its uploads, reload the broker CRL."""
        with self._issue_lock:  # no renewal in flight can add a serial after this list
            serials = self.store.revoke_device(device_id, int(time.time() * 1000))
            if serials is None:
                raise ConfigError(f"unknown device {device_id}")
            changed = self.ca.revoke([int(s, 16) for s in serials])
        self.audit.append("fleet.revoked", device_id, serials=serials, crl_changed=changed)
        self.metrics.inc("fleet_revoked_total")
        self._on_crl_changed(self.ca.crl_path)
        log.info("revoked %s (%d certificates)", device_id, len(serials))
        return serials

    # -- requests (MQTT network thread) ------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        """One request in, the reply (topic, bytes) out, or None when there is no one to tell."""
        if topics.is_enroll_topic(topic):
            try:
                again = enroll.ReenrollRequest.from_bytes(payload)
            except ProtocolError:
                pass
            else:
                return self._reenroll(topic, again)
            try:
                proof = enroll.ActivationProof.from_bytes(payload)
            except ProtocolError:
                return self._enroll(topic, payload)
            return self._activate(topic, proof)
        return self._renew(topic, payload)

    def _enroll(self, topic: str, payload: bytes) -> Reply | None:
        req: enroll.EnrollRequest | None = None
        claim_id = channel = None
        try:
            channel = topics.claim_of_enroll_request(topic)
            req = enroll.EnrollRequest.from_bytes(payload)
            claim_id = req.claim_id
            if channel != enroll.session_channel(claim_id, req.token, req.nonce):
                # another channel than this request's own: answer nobody (issue 9)
                raise MalformedError("request is not on its session channel", "channel_mismatch")
            if self.policy.is_reserved(req.device_id):
                raise MalformedError(f"{req.device_id!r} is reserved", "reserved_device_id")
            self._measure_clock(req.created_at_ms, "enroll", req.device_id)
            req.verify(req.identity_key.encode())
            csr = enroll.check_csr(req.csr, req.device_id)
            if csr.public_key() == enroll.load_identity_key(req.identity_key.encode()):
                raise MalformedError("TLS key must differ from the identity key", "bad_csr")
            known = self.store.device(req.device_id)
            if known is not None and known.status != "active":
                # a claim never re-activates a revoked device: re-provision it by hand
                raise SignatureError(
                    f"device {req.device_id!r} is {known.status}", "revoked_device"
                )
            ek = name = None
            if self._ek_issuers:  # the identity key must prove it lives in a TPM
                ek = attest.check_ek_certificate(req.ek_cert, self._ek_issuers)
                identity = enroll.load_identity_key(req.identity_key.encode())
                name = attest.identity_name(req.identity_public, identity)
            try:  # the claim record is an HSM MAC (claim_record_hash)
                record = claim_record_hash(self._claim_mac, claim_id, req.device_id, req.token)
            except HsmError as e:
                log.error("enroll of %s: the HSM cannot check the claim: %s", req.device_id, e)
                self.metrics.inc("fleet_rejected_total", op="enroll", reason="hsm_unavailable")
                return None  # the claim is intact, the device resends
            why = self.store.check_claim(claim_id, req.device_id, record, _now_ms())
            if why:
                raise SignatureError(f"claim {claim_id} refused: {why}", why)
            if ek is not None and name is not None:
                ch = attest.challenge(ek, name)
                self._pending.put(channel, req.nonce, req, csr, record, ch.secret)
                self.metrics.inc("fleet_challenged_total")
                challenge = enroll.ActivationChallenge(
                    device_id=req.device_id,
                    nonce=req.nonce,
                    credential_blob=ch.credential_blob,
                    encrypted_secret=ch.encrypted_secret,
                )
                return topics.enroll_response(channel), challenge.to_bytes()
        except ProtocolError as e:
            self._rejected("enroll", req.device_id if req else "?", e, claim_id=claim_id)
            if req is None or channel is None or e.reason == "channel_mismatch":
                return None
            return topics.enroll_response(channel), self._refusal(req, e.reason)
        return self._issue_enrollment(claim_id, req, csr, record)

    def _activate(self, topic: str, proof: enroll.ActivationProof) -> Reply | None:
        """The answer to a credential-activation challenge: issue, or refuse."""
        claim_id = proof.claim_id
        try:
            channel = topics.claim_of_enroll_request(topic)
            try:
                secret = base64.b64decode(proof.secret, validate=True)
            except ValueError as e:
                raise MalformedError("secret is not base64", "activation_failed") from e
            # the challenge was sent on its request's channel: the proof must come back there
            pending = self._pending.take(channel, proof.nonce, proof.device_id, secret)
            if pending.request.claim_id != claim_id:
                raise MalformedError("proof names another claim", "claim_mismatch")
        except ProtocolError as e:
            self._rejected("enroll", proof.device_id, e, claim_id=claim_id)
            return None  # nothing to bind a refusal to: the device times out or resends
        self.metrics.inc("fleet_activated_total")
        return self._issue_enrollment(claim_id, pending.request, pending.csr, pending.record)

    def _issue_enrollment(
        self,
        claim_id: str,
        req: enroll.EnrollRequest,
        csr: x509.CertificateSigningRequest,
        record: str,
    ) -> Reply | None:
        try:
            with self._issue_lock:
                # checked before anything is signed; consumed only after the CA signed,
                # so an HSM outage never burns a claim (no answer, the device resends)
                why = self.store.check_claim(claim_id, req.device_id, record, _now_ms())
                if why:
                    raise SignatureError(f"claim {claim_id} refused: {why}", why)
                cert = self._sign(csr, "enroll", req.device_id)
                if cert is None:
                    return None
                why = self.store.use_claim(claim_id, req.device_id, record, _now_ms())
                if why:
                    raise SignatureError(f"claim {claim_id} refused: {why}", why)
                device = self.store.register_device(req.device_id, req.identity_key.encode())
                self._record(cert, req.device_id, "enroll")
        except ProtocolError as e:
            self._rejected("enroll", req.device_id, e, claim_id=claim_id)
            return topics.enroll_response(_channel_of(req)), self._refusal(req, e.reason)
        self.audit.append(
            "fleet.enrolled",
            req.device_id,
            claim_id=claim_id,
            identity_key=device.key_id,
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        self.metrics.inc("fleet_enrolled_total")
        log.info("enrolled %s (identity key %s)", req.device_id, device.key_id)
        return topics.enroll_response(_channel_of(req)), self._issued(
            req.device_id, req.nonce, cert
        )

    def _renew(self, topic: str, payload: bytes) -> Reply | None:
        device: str | None = None
        req: enroll.RenewRequest | None = None
        try:
            device = topics.device_of(topic, topics.CERT_REQUEST)  # CN authenticated by the broker
            req = enroll.RenewRequest.from_bytes(payload)
            if req.device_id != device:
                raise MalformedError("request names another device", "device_mismatch")
            self._check_registered_key(req, device, "renew")
            csr = enroll.check_csr(req.csr, device)
        except ProtocolError as e:
            self._rejected("renew", device or "?", e)
            if req is None or device is None or req.device_id != device:
                return None
            return topics.cert_response(device), self._refusal(req, e.reason)
        with self._issue_lock:  # revoke lists serials under the same lock
            record = self.store.device(device)
            if record is None or record.status != "active":  # revoked while we checked
                refused = SignatureError(f"device {device!r} was revoked", "revoked_device")
                self._rejected("renew", device, refused)
                return topics.cert_response(device), self._refusal(req, refused.reason)
            cert = self._sign(csr, "renew", device)
            if cert is None:
                return None  # the renewer retries with backoff
            self._record(cert, device, "renew")
        self.audit.append(
            "fleet.renewed",
            device,
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        self.metrics.inc("fleet_renewed_total")
        log.info("renewed the certificate of %s", device)
        return topics.cert_response(device), self._issued(device, req.nonce, cert)

    def _check_registered_key(
        self, req: enroll.RenewRequest | enroll.ReenrollRequest, device: str, op: str
    ) -> None:
        """The request is signed by the active device's registered TPM key (``ProtocolError``
        otherwise); its clock skew is measured on the way."""
        record = self.store.device(device)
        if record is None:
            raise SignatureError(f"unknown device {device!r}", "unknown_device")
        if record.status != "active":
            raise SignatureError(f"device {device!r} is {record.status}", "revoked_device")
        if req.kid != record.key_id:
            raise SignatureError("signed with a key that is not the device's", "unknown_key")
        self._measure_clock(req.created_at_ms, op, device)
        req.verify(record.public_key_pem)

    def _reenroll(self, topic: str, req: enroll.ReenrollRequest) -> Reply | None:
        """A registered device whose certificate expired proves its TPM key (ADR 0017)."""
        device = req.device_id
        channel = None
        try:
            channel = topics.claim_of_enroll_request(topic)
            if req.channel != channel:
                raise MalformedError(
                    "request names another channel than its topic", "claim_mismatch"
                )
            if device in self.policy.reserved_ids:
                raise MalformedError(f"{device!r} is reserved", "reserved_device_id")
            self._check_registered_key(req, device, "reenroll")
            csr = enroll.check_csr(req.csr, device)
        except ProtocolError as e:
            self._rejected("reenroll", device, e, channel=channel)
            if channel is None:
                return None
            return topics.enroll_response(channel), self._refusal(req, e.reason)
        cert = self._sign(csr, "reenroll", device)
        if cert is None:
            return None  # CA unavailable: the device tries again
        self._record(cert, device, "reenroll")
        self.audit.append(
            "fleet.reenrolled",
            device,
            identity_key=req.kid,  # checked equal to the registered key
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        self.metrics.inc("fleet_reenrolled_total")
        log.info("re-enrolled %s by its registered TPM key", device)
        return topics.enroll_response(channel), self._issued(device, req.nonce, cert)

    # -- helpers ------------------------------------------------------------------------

    def _sign(
        self, csr: x509.CertificateSigningRequest, op: str, device: str
    ) -> x509.Certificate | None:
        """The certificate for ``csr``; None (counted, audited) when the CA key is unreachable."""
        try:
            return self.ca.issue(csr)
        except HsmError as e:
            log.error("%s of %s: the CA could not sign: %s", op, device, e)
            self.metrics.inc("fleet_rejected_total", op=op, reason="ca_unavailable")
            self.audit.append(
                f"fleet.{op}_rejected", device, reason="ca_unavailable", detail=str(e)[:300]
            )
            return None

    def _measure_clock(self, created_at_ms: int, op: str, device: str) -> None:
        """Measure the device clock; never refuse on it (docs/adr/0017, "Device clocks").

        Freshness does not rest on wall time: a claim is single-use with a TTL on this
        clock, enrollment and re-enrollment answer a TPM challenge or are signed by the
        registered TPM key, and every certificate is for a key only the device holds. A
        request more than ``max_clock_skew_s`` off this clock is counted and audited, so
        an operator sees the device's broken clock, and served.
        """
        skew_s = (created_at_ms - time.time() * 1000) / 1000
        if abs(skew_s) > self.policy.max_clock_skew_s:
            log.warning("%s request from %s is %.0f s off this clock", op, device, skew_s)
            self.metrics.inc("fleet_clock_skewed_total", op=op)
            self.audit.append("fleet.clock_skewed", device, op=op, skew_s=round(skew_s))

    def _record(self, cert: x509.Certificate, device: str, via: str) -> None:
        self.store.add_certificate(
            format(cert.serial_number, "x"),
            device,
            _ms(cert.not_valid_before_utc),
            _ms(cert.not_valid_after_utc),
            via,
        )
        self.metrics.set(
            "device_certificate_expiry_timestamp_seconds",
            cert.not_valid_after_utc.timestamp(),
            device=device,
        )

    def _rejected(self, op: str, device: str, e: ProtocolError, **details: object) -> None:
        log.warning("%s request from %s rejected (%s): %s", op, device, e.reason, e)
        self.metrics.inc("fleet_rejected_total", op=op, reason=e.reason)
        self.audit.append(
            f"fleet.{op}_rejected", device, reason=e.reason, detail=str(e)[:300], **details
        )

    @staticmethod
    def _refusal(
        req: enroll.EnrollRequest | enroll.RenewRequest | enroll.ReenrollRequest, reason: str
    ) -> bytes:
        return enroll.CertResponse(
            device_id=req.device_id,
            nonce=req.nonce,
            status="rejected",
            reason=reason,
            cert="",
            not_after_ms=0,
        ).to_bytes()

    @staticmethod
    def _issued(device: str, nonce: str, cert: x509.Certificate) -> bytes:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        not_after = _ms(cert.not_valid_after_utc)
        return enroll.CertResponse(
            device_id=device,
            nonce=nonce,
            status="issued",
            reason="",
            cert=pem,
            not_after_ms=not_after,
        ).to_bytes()


def _channel_of(req: enroll.EnrollRequest) -> str:
    """The one channel an enrollment's answers go to (``enroll.session_channel``)."""
    return enroll.session_channel(req.claim_id, req.token, req.nonce)


def open_fleet(
    cfg: SidecarConfig, store: EnrollmentRecords, audit: AuditLog, metrics: Metrics
) -> FleetService:
    """The service as configured in ``cfg.fleet`` (HSM or file CA signer, CRL hook)."""
    f = cfg.fleet
    if f is None:
        raise ConfigError("the configuration has no fleet section (fleet.ca_dir)")
    check_hook(f.crl_hook)  # config is code: only a trusted program runs after a revocation
    if not f.ek_ca_certs:  # FleetConfig allows this only with allow_unattested_keys
        log.warning(
            "fleet.allow_unattested_keys: enrollment does NOT check that identity keys live"
            " in a TPM (development only)"
        )
        audit.append("fleet.unattested_keys_allowed", "fleet", ek_ca_certs=0)
    signer: CaSigner
    if f.ca_signer == "hsm":
        from cloud_sidecar.ca import HsmCaSigner

        ca_cert = x509.load_pem_x509_certificate(read_capped(f.ca_dir / "ca.pem"))
        signer = HsmCaSigner(lambda: open_hsm(cfg), ca_cert)
    else:
        signer = file_ca_signer(f.ca_dir)
    ca = FleetCA(signer, f.ca_dir / "crl.pem", dt.timedelta(seconds=f.cert_valid_s))
    # the sidecar's own CN too: a device of that name would get the admin's ACL
    reserved = RESERVED_DEVICE_IDS | {admin_identity(cfg)} | {ota_publisher_identity(cfg) or ""}
    policy = FleetPolicy(f.claim_ttl_s, f.max_clock_skew_s, reserved)

    def claim_mac(data: bytes) -> bytes:
        with open_hsm(cfg) as hsm:  # sessions on one token are shared in-process: cheap
            return hsm.claim_mac(data)

    return FleetService(
        store,
        audit,
        metrics,
        ca,
        policy,
        lambda p: run_crl_hook(f.crl_hook, p),
        claim_mac=claim_mac,
        ek_issuers=[x509.load_pem_x509_certificate(read_capped(p)) for p in f.ek_ca_certs],
    )


def end_session(cfg: SidecarConfig, device_id: str, wait_s: float = 10.0) -> bool:
    """Close a (revoked) device's open MQTT session; True when it was done.

    The broker checks the CRL only at handshakes, so a session opened before the
    revocation would live on. Connecting with the device's client id (devices use their
    id) makes the broker close the older session (MQTT session takeover); the device's
    reconnect then meets the new CRL. Ingest refuses its uploads either way.
    """

    link = open_link(cfg, device_id)
    try:
        link.start(wait_s=wait_s)
        return True
    except TransportError as e:
        log.warning("could not take over the session of %s: %s", device_id, e)
        return False
    finally:
        link.stop()


__all__ = [
    "CaSigner",
    "FleetPolicy",
    "FleetService",
    "end_session",
    "open_fleet",
]
