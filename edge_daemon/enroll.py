"""The device's TLS identity: enrollment, the key at rest, renewal before expiry.

Owns ``<state_dir>/tls/identity.pem``: the device's current client certificate followed
by its private key as encrypted PKCS#8. The key is a P-256 key made in software (Python's
ssl cannot use a TPM-resident key for the handshake); its password is
HKDF-SHA256(TPM-sealed storage key, info="sovereign-edge tls-key v1"), so the file is
useless without this device's TPM (docs/adr/0007-device-identity-and-enrollment.md).

Invariants:
- the identity file is replaced as a whole (temp -> fsync -> rename): certificate and
  key always match, and a crash leaves the old pair or the new one;
- a certificate is installed only after ``fleet_protocol.enroll.check_issued``: it names
  this device, carries the key we just made, and is signed by the pinned fleet CA;
- requests are signed by the TPM identity key; the TLS key's plaintext exists only in
  this process's memory and inside the ssl context;
- enrollment waits for the answer to *its* nonce; renewal runs on its own thread, never
  on the MQTT network thread, and failures are logged and retried with backoff while the
  current certificate is still valid;
- a device whose certificate expired (offline past its lifetime) and whose claim is used
  up re-enrolls by itself over the claim listener, proving the TPM identity key the
  fleet registered (``ReenrollRequest``, docs/adr/0017): at start (``device_endpoint``)
  or from the renewer thread, which then switches the link to the new certificate. The
  replay buffer is not touched: nothing buffered is lost.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_daemon.config import DeviceConfig
from edge_daemon.errors import EdgeError, EnrollmentError
from fleet_protocol import enroll, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink, TransportError

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.pem"
MAX_IDENTITY_BYTES = 16 * 1024
TLS_KEY_INFO = b"sovereign-edge tls-key v1"
SignDigest = Callable[[bytes], bytes]


def tls_key_password(storage_key: bytes) -> bytes:
    """The password of the TLS key at rest, derived from the TPM-sealed storage key."""
    okm = HKDF(hashes.SHA256(), 32, salt=None, info=TLS_KEY_INFO).derive(storage_key)
    return base64.urlsafe_b64encode(okm)


@dataclass(frozen=True)
class TlsIdentity:
    """The installed certificate+key file, its password and its validity."""

    path: Path
    password: bytes
    not_before: dt.datetime
    not_after: dt.datetime

    def renew_due(self, fraction: float, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return now >= self.not_before + (self.not_after - self.not_before) * fraction

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.not_after

    def endpoint(self, host: str, port: int, ca_cert: Path, keepalive_s: int) -> MqttEndpoint:
        return MqttEndpoint(host, port, ca_cert, self.path, self.path, keepalive_s, self.password)


class IdentityStore:
    """``<dir>/identity.pem``: read it back, or install a new certificate and key."""

    def __init__(self, directory: Path, storage_key: bytes) -> None:
        self.path = directory / IDENTITY_FILE
        self._password = tls_key_password(storage_key)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def current(self) -> TlsIdentity | None:
        """The installed identity, or None when there is none or it does not load."""
        if not self.path.exists():
            return None
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_IDENTITY_BYTES + 1)
            if len(data) > MAX_IDENTITY_BYTES:
                raise ValueError(f"larger than {MAX_IDENTITY_BYTES} bytes")
            cert = x509.load_pem_x509_certificate(data)
            key = serialization.load_pem_private_key(data, self._password)
        except (OSError, ValueError, TypeError) as e:
            log.warning("TLS identity %s is unusable (%s); enrolling again", self.path, e)
            return None
        if key.public_key() != cert.public_key():
            log.warning("TLS identity %s: key and certificate differ", self.path)
            return None
        return self._identity(cert)

    def install(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> TlsIdentity:
        """Replace certificate and key together (one file, written atomically)."""
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._password),
        )
        write_atomic(self.path, cert.public_bytes(serialization.Encoding.PEM) + key_pem, 0o600)
        log.info(
            "installed TLS certificate serial %x until %s",
            cert.serial_number,
            cert.not_valid_after_utc,
        )
        return self._identity(cert)

    def _identity(self, cert: x509.Certificate) -> TlsIdentity:
        return TlsIdentity(
            self.path, self._password, cert.not_valid_before_utc, cert.not_valid_after_utc
        )


def _await(
    responses: queue.Queue[bytes], device: str, nonce: str, deadline: float
) -> enroll.CertResponse | enroll.ActivationChallenge | None:
    while (left := deadline - time.monotonic()) > 0:
        try:
            payload = responses.get(timeout=left)
        except queue.Empty:
            return None
        resp: enroll.CertResponse | enroll.ActivationChallenge
        try:
            resp = enroll.CertResponse.from_bytes(payload)
        except ProtocolError as e:
            try:
                resp = enroll.ActivationChallenge.from_bytes(payload)
            except ProtocolError:
                log.warning("ignored a malformed certificate response: %s", e)
                continue
        if resp.nonce == nonce and resp.device_id == device:
            return resp
    return None


def _accept(
    resp: enroll.CertResponse,
    device: str,
    key: ec.EllipticCurvePrivateKey,
    ca_pem: bytes,
    store: IdentityStore,
) -> TlsIdentity:
    if resp.status != "issued":
        raise EnrollmentError(f"the fleet refused: {resp.reason}", resp.reason or "refused")
    try:
        cert = enroll.check_issued(resp.cert, device, key.public_key(), ca_pem)
    except ProtocolError as e:
        raise EnrollmentError(f"issued certificate rejected: {e}", e.reason) from e
    return store.install(key, cert)


def enroll_device(
    device: str,
    claim: enroll.Claim,
    sign_digest: SignDigest,
    identity_public_pem: bytes,
    store: IdentityStore,
    claim_endpoint: MqttEndpoint,
    timeout_s: float = 60.0,
    resend_s: float = 5.0,
    tpm: TpmAttestation | None = None,
) -> TlsIdentity:
    """Enroll over the claim identity; install and return the issued identity.

    Resends the same signed request every ``resend_s`` (the sidecar may not be
    subscribed yet) until an answer to its nonce arrives or ``timeout_s`` passes. With
    ``tpm`` the request carries the EK certificate and the identity key's TPM public
    area, and a credential-activation challenge is answered from the TPM (ADR 0018).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    req = enroll.EnrollRequest(
        device_id=device,
        claim_id=claim.claim_id,
        token=claim.token,
        csr=enroll.make_csr(key, device),
        identity_key=identity_public_pem.decode("ascii"),
        identity_public=""
        if tpm is None
        else base64.b64encode(tpm.identity_public_area()).decode(),
        ek_cert="" if tpm is None else tpm.ek_certificate_pem(),
        created_at_ms=int(time.time() * 1000),
        nonce=enroll.new_nonce(),
    ).signed(sign_digest)
    channel = enroll.session_channel(claim.claim_id, claim.token, req.nonce)  # issue 9
    resp = _exchange(claim_endpoint, channel, req.to_bytes(), device, req.nonce,
                     timeout_s, resend_s, lambda ch: _answer(ch, claim, tpm))  # fmt: skip
    identity = _accept(resp, device, key, claim_endpoint.ca_cert.read_bytes(), store)
    log.info("enrolled as %s", device)
    return identity


def reenroll_device(
    device: str,
    sign_digest: SignDigest,
    identity_key_id: str,
    store: IdentityStore,
    claim_endpoint: MqttEndpoint,
    timeout_s: float = 60.0,
    resend_s: float = 5.0,
) -> TlsIdentity:
    """Get a new certificate after the old one expired, proving the registered TPM key.

    Over the claim listener (the expired certificate no longer passes the device
    listener's handshake), on a fresh channel id; no claim needed.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    channel = secrets.token_hex(8)
    req = enroll.ReenrollRequest(
        device_id=device,
        channel=channel,
        kid=identity_key_id,
        csr=enroll.make_csr(key, device),
        created_at_ms=int(time.time() * 1000),
        nonce=enroll.new_nonce(),
    ).signed(sign_digest)
    resp = _exchange(claim_endpoint, channel, req.to_bytes(), device, req.nonce,
                     timeout_s, resend_s)  # fmt: skip
    identity = _accept(resp, device, key, claim_endpoint.ca_cert.read_bytes(), store)
    log.info("re-enrolled as %s with the registered TPM key", device)
    return identity


def _exchange(
    endpoint: MqttEndpoint,
    channel: str,
    request: bytes,
    device: str,
    nonce: str,
    timeout_s: float,
    resend_s: float,
    answer: Callable[[enroll.ActivationChallenge], bytes] | None = None,
) -> enroll.CertResponse:
    """Publish ``request`` on the channel's enrollment topic until its answer arrives;
    a credential-activation challenge is answered by ``answer`` (first enrollment only)."""
    responses: queue.Queue[bytes] = queue.Queue(maxsize=16)
    link = MqttLink(endpoint, client_id=channel, on_message=lambda _t, p: _offer(responses, p))
    link.subscribe(topics.enroll_response(channel), 1)
    deadline = time.monotonic() + timeout_s
    try:
        link.start(wait_s=timeout_s)
        resp: enroll.CertResponse | enroll.ActivationChallenge | None = None
        message = request
        while time.monotonic() < deadline:
            link.publish(topics.enroll_request(channel), message, 1, timeout_s=5)
            resp = _await(responses, device, nonce, min(deadline, time.monotonic() + resend_s))
            if isinstance(resp, enroll.ActivationChallenge):
                if answer is None:
                    raise EnrollmentError("unexpected credential-activation challenge", "refused")
                message = answer(resp)  # then resend the proof until answered
                resp = None
            elif resp is not None:
                break
    except TransportError as e:
        raise EnrollmentError(f"cannot reach the broker with the claim certificate: {e}") from e
    finally:
        link.stop()
    if not isinstance(resp, enroll.CertResponse):
        raise EnrollmentError(f"no enrollment answer within {timeout_s:.0f} s", "timeout")
    return resp


class TpmAttestation(Protocol):
    """What credential activation needs from the TPM (``TpmKeyStore``)."""

    def ek_certificate_pem(self) -> str: ...

    def identity_public_area(self) -> bytes: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...


def _answer(
    ch: enroll.ActivationChallenge, claim: enroll.Claim, tpm: TpmAttestation | None
) -> bytes:
    """The ``ActivationProof`` for a challenge: the secret only this TPM can recover."""
    if tpm is None:
        raise EnrollmentError("the fleet asks for TPM credential activation", "no_tpm")
    try:
        secret = tpm.activate_credential(
            base64.b64decode(ch.credential_blob), base64.b64decode(ch.encrypted_secret)
        )
    except EdgeError as e:
        raise EnrollmentError(f"credential activation failed: {e}", "activation_failed") from e
    log.info("answered the fleet's TPM credential-activation challenge")
    return enroll.ActivationProof(
        device_id=ch.device_id,
        claim_id=claim.claim_id,
        nonce=ch.nonce,
        secret=base64.b64encode(secret).decode(),
    ).to_bytes()


def _offer(q: queue.Queue[bytes], payload: bytes) -> None:
    try:
        q.put_nowait(payload)
    except queue.Full:
        log.warning("dropped a certificate response: queue full")


class Renewer:
    """Renews the certificate over the device's own session when ``renew_at`` of it has passed."""

    def __init__(
        self,
        device: str,
        sign_digest: SignDigest,
        identity_key_id: str,
        store: IdentityStore,
        link: MqttLink,
        ca_pem: bytes,
        renew_at: float = 2 / 3,
        check_every_s: float = 60.0,
        timeout_s: float = 30.0,
        reenroll: Callable[[], TlsIdentity] | None = None,
        faults: LoopFaults | None = None,
    ) -> None:
        self.device = device
        self._reenroll = reenroll
        self.faults = faults if faults is not None else LoopFaults()
        self._sign = sign_digest
        self._kid = identity_key_id
        self._store = store
        self._link = link
        self._ca_pem = ca_pem
        self._renew_at = renew_at
        self._every = check_every_s
        self._timeout = timeout_s
        self._responses: queue.Queue[bytes] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None
        self.renewed = 0
        self.reenrolled = 0

    @property
    def response_topic(self) -> str:
        return topics.cert_response(self.device)

    def on_message(self, payload: bytes) -> None:
        """Feed a message from ``response_topic`` (network thread: only enqueues)."""
        _offer(self._responses, payload)

    def renew_once(self) -> TlsIdentity:
        """Ask for, check, install and switch to a new certificate with a new key."""
        key = ec.generate_private_key(ec.SECP256R1())
        req = enroll.RenewRequest(
            device_id=self.device,
            kid=self._kid,
            csr=enroll.make_csr(key, self.device),
            created_at_ms=int(time.time() * 1000),
            nonce=enroll.new_nonce(),
        ).signed(self._sign)
        topic = topics.cert_request(self.device)
        if not self._link.publish(topic, req.to_bytes(), qos=1, timeout_s=self._timeout):
            raise EnrollmentError("renewal request not accepted by the broker", "publish_failed")
        resp = _await(self._responses, self.device, req.nonce, time.monotonic() + self._timeout)
        if not isinstance(resp, enroll.CertResponse):
            raise EnrollmentError(f"no renewal answer within {self._timeout:.0f} s", "timeout")
        identity = _accept(resp, self.device, key, self._ca_pem, self._store)
        self._link.reload_client_cert(identity.path, identity.path, identity.password)
        self.renewed += 1
        log.info("renewed the TLS certificate; valid until %s", identity.not_after)
        return identity

    def reenroll_once(self) -> TlsIdentity:
        """The certificate expired: re-enroll with the TPM key, switch the link to it."""
        if self._reenroll is None:
            raise EnrollmentError("certificate expired and re-enrollment is not configured")
        identity = self._reenroll()
        self._link.reload_client_cert(identity.path, identity.path, identity.password)
        self.reenrolled += 1
        return identity

    def run(self, stop: threading.Event) -> None:
        """Check every ``check_every_s``; after a failure back off (doubling, at most 1 h).

        No exception ends this thread (a TPM that is busy, a corrupt identity file, a
        response nobody foresaw): the certificate would expire. Expected failures
        (``EnrollmentError``, ``TransportError``) are logged; anything else is counted in
        ``faults`` (loop ``renewer``) as well; both back off and try again.
        """
        backoff = self._every
        while not stop.wait(backoff):
            try:
                current = self._store.current()
                if current is None or current.expired():
                    self.reenroll_once()  # the device session cannot carry a renewal now
                elif current.renew_due(self._renew_at):
                    self.renew_once()
                backoff = self._every
            except (EnrollmentError, TransportError) as e:
                backoff = min(backoff * 2, 3600.0)
                log.warning("certificate renewal failed (%s); retrying in %.0f s", e, backoff)
            except Exception as e:
                backoff = min(backoff * 2, 3600.0)
                self.faults.record("renewer", e)

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(stop,), name="cert-renewer", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)


# -- composition helpers for edge_daemon/app.py ------------------------------------------


class _TpmIdentity(TpmAttestation, Protocol):
    def sign_digest(self, digest: bytes) -> bytes: ...

    def signing_public_key_pem(self) -> bytes: ...

    def signing_key_id(self) -> str: ...

    def storage_key(self) -> bytes: ...


def device_endpoint(cfg: DeviceConfig, keys: _TpmIdentity) -> MqttEndpoint:
    """The broker endpoint with this device's identity: fixed, installed, or enrolled now."""
    b = cfg.broker
    if b.client_cert is not None and b.client_key is not None:
        return MqttEndpoint(b.host, b.port, b.ca_cert, b.client_cert, b.client_key, b.keepalive_s)
    e = cfg.enrollment
    if e is None:  # excluded by DeviceConfig's validator
        raise EnrollmentError("no client certificate and no enrollment configured", "config")
    store = IdentityStore(cfg.state_dir / "tls", keys.storage_key())
    identity = store.current()
    if identity is None or identity.expired():
        claim_endpoint = _claim_endpoint(cfg)
        if not e.claim_file.exists():  # used up: prove the registered TPM key instead
            log.warning("no valid certificate and no claim: re-enrolling with the TPM key")
            identity = reenroll_device(
                cfg.device_id,
                keys.sign_digest,
                keys.signing_key_id(),
                store,
                claim_endpoint,
                e.timeout_s,
            )
            return identity.endpoint(b.host, b.port, b.ca_cert, b.keepalive_s)
        try:
            claim = enroll.Claim.parse(e.claim_file.read_text()[:200])
        except OSError as err:
            raise EnrollmentError(f"no certificate and no claim ({err})", "no_claim") from err
        except ProtocolError as err:
            raise EnrollmentError(f"{e.claim_file}: {err}", err.reason) from err
        identity = enroll_device(
            cfg.device_id,
            claim,
            keys.sign_digest,
            keys.signing_public_key_pem(),
            store,
            claim_endpoint,
            e.timeout_s,
            tpm=keys,
        )
        e.claim_file.unlink(missing_ok=True)  # one-time: it is used up now
    return identity.endpoint(b.host, b.port, b.ca_cert, b.keepalive_s)


def _claim_endpoint(cfg: DeviceConfig) -> MqttEndpoint:
    b, e = cfg.broker, cfg.enrollment
    if e is None:
        raise EnrollmentError("no enrollment configured", "config")
    port = b.port if e.port is None else e.port  # the enrollment listener
    return MqttEndpoint(b.host, port, b.ca_cert, e.claim_cert, e.claim_key)


def make_renewer(
    cfg: DeviceConfig, keys: _TpmIdentity, link: MqttLink, faults: LoopFaults | None = None
) -> Renewer | None:
    """A renewer for an enrolled identity (re-enrolling once it expired); None for a fixed
    certificate."""
    e = cfg.enrollment
    if cfg.broker.client_cert is not None or e is None:
        return None
    store = IdentityStore(cfg.state_dir / "tls", keys.storage_key())

    def reenroll() -> TlsIdentity:
        return reenroll_device(
            cfg.device_id, keys.sign_digest, keys.signing_key_id(), store,
            _claim_endpoint(cfg), e.timeout_s,
        )  # fmt: skip

    return Renewer(
        cfg.device_id,
        keys.sign_digest,
        keys.signing_key_id(),
        store,
        link,
        cfg.broker.ca_cert.read_bytes(),
        renew_at=e.renew_at,
        check_every_s=e.check_every_s,
        reenroll=reenroll,
        faults=faults,
    )


__all__ = [
    "IdentityStore",
    "Renewer",
    "TlsIdentity",
    "device_endpoint",
    "enroll_device",
    "make_renewer",
    "reenroll_device",
    "tls_key_password",
]
