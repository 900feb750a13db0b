"""Device enrollment and certificate renewal messages (sans-IO).

Owns: the enrollment and renewal wire messages, their topics, their byte caps and
field rules, the TPM-signature digests they carry, and the checks both sides run on
CSRs and issued certificates. Bytes in, a frozen message or a ``ProtocolError`` out;
no sockets, no files, no key custody (signing is a callable: the TPM).

Flow (docs/adr/0007-device-identity-and-enrollment.md)::

    device (claim cert, client id = claim id)          sidecar
      EnrollRequest  --> fleet/v1/enroll/<claim>/request
                     <-- fleet/v1/enroll/<claim>/response  CertResponse
    device (own short-lived cert)
      RenewRequest   --> fleet/v1/<device>/cert/request
                     <-- fleet/v1/<device>/cert/response   CertResponse

Invariants:
- every message is canonical JSON (sorted keys, separators ``,`` ``:``, UTF-8) with
  exactly its fields; a non-canonical encoding is malformed, so a signed message has
  one byte representation;
- a request's ``sig`` is an ECDSA P-256 signature (strict DER) by the device's TPM
  identity key over SHA-256(domain tag || canonical JSON without ``sig``); the domain
  tags differ for enrollment and renewal, so one can never be replayed as the other;
- every parser checks the total size first (``MAX_MESSAGE_BYTES``), then each field's
  type, length and pattern, and raises only ``ProtocolError`` subclasses, whatever
  the input;
- a CSR is accepted only for an EC P-256 key, with a valid self-signature and a subject
  of exactly ``CN=<device id>``; an issued certificate is accepted by the device only
  when its CN, public key and issuer signature match what it asked for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, SignatureError, TooLargeError

VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024
MAX_CSR_PEM = 4096
MAX_CERT_PEM = 8192
MAX_KEY_PEM = 1024
MAX_SIGNATURE = 80
MAX_REASON = 64
MAX_INT = 2**63 - 1

ENROLL_TAG = b"sovereign-edge enroll v1\x00"
RENEW_TAG = b"sovereign-edge renew v1\x00"
ENROLL_PREFIX = f"{topics.PREFIX}/enroll"

CLAIM_ID_RE = re.compile(r"[0-9a-f]{16}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 random bytes, urlsafe base64, no padding
NONCE_RE = re.compile(r"[0-9a-f]{32}")
KID_RE = re.compile(r"[0-9a-f]{16}")
REASON_RE = re.compile(r"[a-z0-9_]{0,64}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_PEM_RE = re.compile(r"-----BEGIN [A-Z ]+-----\n[A-Za-z0-9+/=\n]+-----END [A-Z ]+-----\n?")
_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))

SignDigest = Callable[[bytes], bytes]

# -- topics ----------------------------------------------------------------------------


def _claim_id(claim_id: str) -> str:
    if not isinstance(claim_id, str) or not CLAIM_ID_RE.fullmatch(claim_id):
        raise MalformedError(f"invalid claim id {str(claim_id)[:40]!r}", "bad_claim_id")
    return claim_id


def enroll_request_topic(claim_id: str) -> str:
    return f"{ENROLL_PREFIX}/{_claim_id(claim_id)}/request"


def enroll_response_topic(claim_id: str) -> str:
    return f"{ENROLL_PREFIX}/{_claim_id(claim_id)}/response"


def cert_request_topic(device: str) -> str:
    return f"{topics.PREFIX}/{topics.check_device_id(device)}/cert/request"


def cert_response_topic(device: str) -> str:
    return f"{topics.PREFIX}/{topics.check_device_id(device)}/cert/response"


ENROLL_SUBSCRIPTION = f"$share/enroll/{ENROLL_PREFIX}/+/request"
RENEW_SUBSCRIPTION = f"$share/enroll/{topics.PREFIX}/+/cert/request"


def claim_of_topic(topic: str) -> str:
    """The claim id in ``fleet/v1/enroll/<claim>/request``; ``MalformedError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != ENROLL_PREFIX or parts[4] != "request":
        raise MalformedError(f"not an enrollment topic: {topic[:120]!r}", "bad_topic")
    return _claim_id(parts[3])


def device_of_cert_request(topic: str) -> str:
    """The device id in ``fleet/v1/<device>/cert/request``; ``MalformedError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != topics.PREFIX or parts[3:] != ["cert", "request"]:
        raise MalformedError(f"not a renewal topic: {topic[:120]!r}", "bad_topic")
    return topics.check_device_id(parts[2])


# -- claims ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A one-time claim: a public id (names the topics) and a secret token."""

    claim_id: str
    token: str

    @classmethod
    def new(cls) -> Claim:
        return cls(secrets.token_hex(8), secrets.token_urlsafe(32))

    def __str__(self) -> str:
        return f"{self.claim_id}.{self.token}"

    @classmethod
    def parse(cls, text: str) -> Claim:
        """Parse ``<claim id>.<token>`` as ``cloud-sidecar fleet claim`` prints it."""
        claim_id, _, token = text.strip().partition(".")
        _claim_id(claim_id)
        if not TOKEN_RE.fullmatch(token):
            raise MalformedError("claim token has the wrong format", "bad_token")
        return cls(claim_id, token)


def token_hash(token: str) -> str:
    """What the cloud stores instead of the token (it has 256 random bits: no KDF needed)."""
    return hashlib.sha256(b"sovereign-edge claim v1\x00" + token.encode()).hexdigest()


# -- messages --------------------------------------------------------------------------


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_constant(name: str) -> Any:
    raise MalformedError(f"non-finite number {name}")


def _load(data: bytes, cls: type[Any]) -> dict[str, Any]:
    name = cls.__name__
    if not isinstance(data, bytes | bytearray):
        raise MalformedError(f"{name} must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise TooLargeError(f"{name} of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise MalformedError(f"{name} is not JSON: {str(e)[:80]}") from e
    expected = {f.name for f in fields(cls)}
    if not isinstance(obj, dict) or set(obj) != expected:
        raise MalformedError(f"{name} must have exactly the fields {sorted(expected)}")
    if _canonical(obj) != bytes(data):
        raise MalformedError(f"{name} is not canonical JSON")
    if obj["v"] != VERSION or type(obj["v"]) is not int:
        raise MalformedError(f"{name} version {str(obj['v'])[:20]!r} is not {VERSION}")
    return obj


def _str(o: dict[str, Any], name: str, pattern: re.Pattern[str], reason: str = "malformed") -> str:
    v = o[name]
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise MalformedError(f"field {name} is invalid", reason)
    return v


def _int(o: dict[str, Any], name: str) -> int:
    v = o[name]
    if type(v) is not int or not 0 <= v <= MAX_INT:
        raise MalformedError(f"field {name} must be an integer in [0, 2**63)")
    return v


def _pem(o: dict[str, Any], name: str, cap: int, allow_empty: bool = False) -> str:
    v = o[name]
    if not isinstance(v, str):
        raise MalformedError(f"field {name} must be a string")
    if len(v) > cap:
        raise TooLargeError(f"field {name} exceeds {cap} characters")
    if allow_empty and v == "":
        return v
    if not _PEM_RE.fullmatch(v):
        raise MalformedError(f"field {name} is not PEM")
    return v


def _sig(o: dict[str, Any]) -> bytes:
    v = o["sig"]
    if not isinstance(v, str) or len(v) > 4 * MAX_SIGNATURE // 3 + 4 or not _B64_RE.fullmatch(v):
        raise MalformedError("field sig is not base64", "bad_signature")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MalformedError("field sig is not base64", "bad_signature") from e
    try:
        r, s = utils.decode_dss_signature(raw)
    except ValueError as e:
        raise MalformedError("sig is not a DER ECDSA signature", "bad_signature") from e
    if utils.encode_dss_signature(r, s) != raw or base64.b64encode(raw).decode() != v:
        raise MalformedError("sig is not strict DER in canonical base64", "bad_signature")
    return raw


class _Signed:
    """Shared behaviour of the two TPM-signed requests."""

    TAG: bytes = b""
    sig: str

    def body(self) -> bytes:
        doc = asdict(self)  # type: ignore[call-overload]
        doc.pop("sig")
        return _canonical(doc)

    def signed_digest(self) -> bytes:
        return hashlib.sha256(self.TAG + self.body()).digest()

    def to_bytes(self) -> bytes:
        return _canonical(asdict(self))  # type: ignore[call-overload]

    def signed(self, sign_digest: SignDigest) -> Self:
        der = sign_digest(self.signed_digest())
        return replace(self, sig=base64.b64encode(der).decode("ascii"))  # type: ignore[type-var]

    def verify(self, public_key_pem: bytes) -> None:
        """Raise ``SignatureError`` unless ``sig`` was made by ``public_key_pem``'s key."""
        key = load_identity_key(public_key_pem)
        try:
            key.verify(base64.b64decode(self.sig), self.signed_digest(), _ECDSA)
        except (InvalidSignature, ValueError) as e:
            raise SignatureError("request signature does not verify", "bad_signature") from e


@dataclass(frozen=True)
class EnrollRequest(_Signed):
    """Device → cloud over the claim identity: prove the claim, present keys, ask for a cert."""

    TAG = ENROLL_TAG

    device_id: str
    claim_id: str
    token: str
    csr: str
    identity_key: str
    created_at_ms: int
    nonce: str
    sig: str = ""
    v: int = VERSION

    @classmethod
    def from_bytes(cls, data: bytes) -> EnrollRequest:
        o = _load(data, cls)
        req = cls(
            device_id=_str(o, "device_id", topics.DEVICE_ID_RE, "bad_device_id"),
            claim_id=_str(o, "claim_id", CLAIM_ID_RE, "bad_claim_id"),
            token=_str(o, "token", TOKEN_RE, "bad_token"),
            csr=_pem(o, "csr", MAX_CSR_PEM),
            identity_key=_pem(o, "identity_key", MAX_KEY_PEM),
            created_at_ms=_int(o, "created_at_ms"),
            nonce=_str(o, "nonce", NONCE_RE),
            sig=o["sig"],
        )
        _sig(o)
        return req


@dataclass(frozen=True)
class RenewRequest(_Signed):
    """Device → cloud over its own mTLS session: a fresh CSR signed by its TPM identity."""

    TAG = RENEW_TAG

    device_id: str
    kid: str
    csr: str
    created_at_ms: int
    nonce: str
    sig: str = ""
    v: int = VERSION

    @classmethod
    def from_bytes(cls, data: bytes) -> RenewRequest:
        o = _load(data, cls)
        req = cls(
            device_id=_str(o, "device_id", topics.DEVICE_ID_RE, "bad_device_id"),
            kid=_str(o, "kid", KID_RE),
            csr=_pem(o, "csr", MAX_CSR_PEM),
            created_at_ms=_int(o, "created_at_ms"),
            nonce=_str(o, "nonce", NONCE_RE),
            sig=o["sig"],
        )
        _sig(o)
        return req


@dataclass(frozen=True)
class CertResponse:
    """Cloud → device: the issued certificate, or why none was issued."""

    device_id: str
    nonce: str
    status: str  # issued | rejected
    reason: str
    cert: str  # PEM; "" when rejected
    not_after_ms: int
    v: int = VERSION

    def to_bytes(self) -> bytes:
        return _canonical(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> CertResponse:
        o = _load(data, cls)
        status = o["status"]
        if status not in ("issued", "rejected"):
            raise MalformedError("status must be issued or rejected")
        resp = cls(
            device_id=_str(o, "device_id", topics.DEVICE_ID_RE, "bad_device_id"),
            nonce=_str(o, "nonce", NONCE_RE),
            status=status,
            reason=_str(o, "reason", REASON_RE),
            cert=_pem(o, "cert", MAX_CERT_PEM, allow_empty=status == "rejected"),
            not_after_ms=_int(o, "not_after_ms"),
        )
        return resp


def new_nonce() -> str:
    return secrets.token_hex(16)


# -- keys, CSRs and certificates ---------------------------------------------------------


def load_identity_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from SPKI PEM, or ``MalformedError(bad_identity_key)``."""
    if len(pem) > MAX_KEY_PEM:
        raise TooLargeError(f"identity key exceeds {MAX_KEY_PEM} bytes")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise MalformedError("identity key is not a PEM public key", "bad_identity_key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedError("identity key is not EC P-256", "bad_identity_key")
    return key


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """First 16 hex chars of SHA-256 over SPKI DER (same as ``envelope.key_id_from_pem``)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _only_cn(name: x509.Name) -> str | None:
    attrs = list(name)
    if len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def make_csr(private_key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """A PEM CSR with subject exactly ``CN=<device id>``, self-signed with ECDSA-SHA256."""
    topics.check_device_id(device_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def check_csr(csr_pem: str, device_id: str) -> x509.CertificateSigningRequest:
    """The parsed CSR if it is P-256, self-signed and names exactly ``device_id``."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as e:
        raise MalformedError("CSR does not parse", "bad_csr") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedError("CSR key is not EC P-256", "bad_csr")
    if not valid:
        raise SignatureError("CSR self-signature does not verify", "bad_csr")
    if _only_cn(csr.subject) != device_id:
        raise MalformedError("CSR subject is not CN=<device id>", "bad_csr")
    return csr


def check_issued(
    cert_pem: str, device_id: str, expected_key: ec.EllipticCurvePublicKey, ca_pem: bytes
) -> x509.Certificate:
    """Device side: the issued cert names us, carries our new key and is signed by the CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
        public = cert.public_key()
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as e:
        raise MalformedError(f"issued certificate is unusable: {e}", "bad_certificate") from e
    except InvalidSignature as e:
        raise SignatureError("issued certificate is not signed by the fleet CA") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != device_id:
        raise MalformedError("issued certificate names another device", "bad_certificate")
    if public != expected_key:
        raise MalformedError("issued certificate is for another key", "bad_certificate")
    return cert


__all__ = [
    "ENROLL_SUBSCRIPTION",
    "RENEW_SUBSCRIPTION",
    "CertResponse",
    "Claim",
    "EnrollRequest",
    "RenewRequest",
    "cert_request_topic",
    "cert_response_topic",
    "check_csr",
    "check_issued",
    "claim_of_topic",
    "device_of_cert_request",
    "enroll_request_topic",
    "enroll_response_topic",
    "key_id",
    "load_identity_key",
    "make_csr",
    "new_nonce",
    "token_hash",
]
