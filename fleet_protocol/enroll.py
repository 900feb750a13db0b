"""Device enrollment and certificate renewal messages (sans-IO).

Owns: the enrollment and renewal wire messages (``WireModel``s, fleet_protocol/wire.py),
their byte caps and field rules, the TPM-signature digests they carry, and the checks both sides run on
CSRs and issued certificates. Bytes in, a frozen message or a ``ProtocolError`` out;
no sockets, no files, no key custody (signing is a callable: the TPM).

Flow (docs/adr/0007-device-identity-and-enrollment.md)::

    device (claim cert, client id = channel)           sidecar      (topics: fleet_protocol.topics)
      EnrollRequest  --> fleet/v1/enroll/<channel>/request   (channel = session_channel(...))
                     <-- fleet/v1/enroll/<channel>/response  CertResponse
    device (own short-lived cert)
      RenewRequest   --> fleet/v1/<device>/cert/request
                     <-- fleet/v1/<device>/cert/response   CertResponse
    device (certificate expired, claim used up; claim cert, client id = a fresh channel)
      ReenrollRequest --> fleet/v1/enroll/<channel>/request   signed by the registered
                      <-- fleet/v1/enroll/<channel>/response  TPM key (docs/adr/0017)

Invariants:
- every message is canonical JSON (sorted keys, separators ``,`` ``:``, UTF-8) with
  exactly its fields; a non-canonical encoding is malformed, so a signed message has
  one byte representation;
- a request's ``sig`` is an ECDSA P-256 signature (strict DER, low S) by the device's TPM
  identity key over SHA-256(domain tag || canonical JSON without ``sig``); the domain
  tags differ for enrollment, renewal and re-enrollment, so one can never be replayed
  as another;
- every parser checks the total size first (``MAX_MESSAGE_BYTES``), then each field's
  type, length and pattern, and raises only ``ProtocolError`` subclasses, whatever
  the input; canonicalising a document (to check its encoding or to compute the
  signed digest) raises only ``MalformedError`` (``wire.canonical_json``: a lone
  surrogate is refused, never a ``UnicodeEncodeError``);
- a CSR is accepted only for an EC P-256 key, with a valid self-signature and a subject
  of exactly ``CN=<device id>``; an issued certificate is accepted by the device only
  when its CN, public key and issuer signature match what it asked for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID
from pydantic import ConfigDict, Field, model_validator

from fleet_protocol import low_s, topics
from fleet_protocol.errors import MalformedError, SignatureError, TooLargeError
from fleet_protocol.wire import DeviceId, UInt63, WireModel, canonical_json

VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024
MAX_CSR_PEM = 4096
MAX_CERT_PEM = 8192
MAX_TPM_BLOB = 1024  # TPM2B_PUBLIC of a P-256 key, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET
MAX_KEY_PEM = 1024
MAX_SIGNATURE = 80
MAX_REASON = 64
MAX_INT = 2**63 - 1

ENROLL_TAG = b"sovereign-edge enroll v1\x00"
RENEW_TAG = b"sovereign-edge renew v1\x00"
REENROLL_TAG = b"sovereign-edge reenroll v1\x00"

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 random bytes, urlsafe base64, no padding
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
KID_RE = re.compile(r"^[0-9a-f]{16}$")
REASON_RE = re.compile(r"^[a-z0-9_]{0,64}$")
_PEM_RE = re.compile(r"-----BEGIN [A-Z ]+-----\n[A-Za-z0-9+/=\n]+-----END [A-Z ]+-----\n?")
_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
_B64 = r"^([A-Za-z0-9+/]+={0,2})?$"
# schema examples: the right shapes, not a real CSR, key or signature
_EXAMPLE_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nTUlJQg==\n-----END CERTIFICATE REQUEST-----\n"
_EXAMPLE_KEY = "-----BEGIN PUBLIC KEY-----\nTUZrdw==\n-----END PUBLIC KEY-----\n"
_EXAMPLE_CERT = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n"
_EXAMPLE_SIG = "MAYCAQECAQE="  # DER SEQUENCE { INTEGER 1, INTEGER 1 }

SignDigest = Callable[[bytes], bytes]

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
        topics.check_claim_id(claim_id)
        if not TOKEN_RE.fullmatch(token):
            raise MalformedError("claim token has the wrong format", "bad_token")
        return cls(claim_id, token)


def token_hash(token: str) -> str:
    """What the cloud stores instead of the token (it has 256 random bits: no KDF needed)."""
    return hashlib.sha256(b"sovereign-edge claim v1\x00" + token.encode()).hexdigest()


# -- messages --------------------------------------------------------------------------

Version = Annotated[int, Field(ge=VERSION, le=VERSION, description="protocol version")]
Signature = Annotated[
    str,
    Field(
        max_length=4 * MAX_SIGNATURE // 3 + 4,
        pattern=r"^([A-Za-z0-9+/]+={0,2})?$",
        description="base64 of a strict-DER ECDSA P-256 signature by the TPM identity key"
        " over SHA-256(domain tag || canonical JSON without sig); empty only before signing",
    ),
]
Nonce = Annotated[str, Field(pattern=NONCE_RE.pattern, description="32 hex, fresh per request")]
CreatedAt = Annotated[UInt63, Field(description="when the device made the request, Unix ms")]


def _pem(cap: int, what: str, allow_empty: bool = False) -> Any:
    body = _PEM_RE.pattern
    return Field(
        max_length=cap,
        pattern=f"^({body})?$" if allow_empty else f"^{body}$",
        description=f"{what} (PEM, at most {cap} characters)",
    )


class _Canonical(WireModel):
    """Enrollment messages: canonical JSON only, so a signed message has one encoding."""

    ABSTRACT: ClassVar[bool] = True
    MAX_BYTES: ClassVar[int] = MAX_MESSAGE_BYTES

    v: Version = VERSION

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        msg = super().from_bytes(data)
        if msg.to_bytes() != bytes(data):
            raise MalformedError(f"{cls.__name__} is not canonical JSON")
        return msg


class _Signed(_Canonical):
    """Shared behaviour of the two TPM-signed requests."""

    ABSTRACT: ClassVar[bool] = True
    TAG: ClassVar[bytes] = b""

    sig: Signature = ""

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        msg = super().from_bytes(data)
        _strict_der(msg.sig)
        return msg

    def body(self) -> bytes:
        """The canonical JSON the signature covers (every field but ``sig``)."""
        return canonical_json(self.model_dump(mode="json", exclude={"sig"}))

    def signed_digest(self) -> bytes:
        return hashlib.sha256(self.TAG + self.body()).digest()

    def signed(self, sign_digest: SignDigest) -> Self:
        der = low_s.normalize(sign_digest(self.signed_digest()))
        sig = base64.b64encode(der).decode("ascii")
        return type(self).model_validate({**self.model_dump(), "sig": sig})

    def verify(self, public_key_pem: bytes) -> None:
        """Raise ``SignatureError`` unless ``sig`` was made by ``public_key_pem``'s key."""
        key = load_identity_key(public_key_pem)
        try:
            key.verify(base64.b64decode(self.sig), self.signed_digest(), _ECDSA)
        except (InvalidSignature, ValueError) as e:
            raise SignatureError("request signature does not verify", "bad_signature") from e


def _strict_der(sig: str) -> bytes:
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MalformedError("field sig is not base64", "bad_signature") from e
    low_s.check(raw)  # strict DER, low S: the broker cannot re-encode a request
    if base64.b64encode(raw).decode() != sig:
        raise MalformedError("sig is not in canonical base64", "bad_signature")
    return raw


class EnrollRequest(_Signed):
    """Device → cloud over the claim identity on ``fleet/v1/enroll/<channel>/request``
    (``session_channel`` of its claim id, token and nonce): prove the claim, present
    keys, ask for a certificate."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "claim_id": "0123456789abcdef",
                    "created_at_ms": 1764000000000,
                    "csr": _EXAMPLE_CSR,
                    "device_id": "pi-07",
                    "ek_cert": _EXAMPLE_CERT,
                    "identity_key": _EXAMPLE_KEY,
                    "identity_public": "AFoAIw==",
                    "nonce": "ab" * 16,
                    "sig": _EXAMPLE_SIG,
                    "token": "A" * 43,
                    "v": VERSION,
                }
            ]
        }
    )
    TAG: ClassVar[bytes] = ENROLL_TAG
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {
        "device_id": "bad_device_id",
        "claim_id": "bad_claim_id",
        "token": "bad_token",
        "sig": "bad_signature",
    }

    device_id: DeviceId
    claim_id: Annotated[str, Field(pattern=topics.CLAIM_ID_RE.pattern, description="16 hex")]
    token: Annotated[
        str, Field(pattern=TOKEN_RE.pattern, description="the claim's secret (base64url)")
    ]
    csr: Annotated[str, _pem(MAX_CSR_PEM, "CSR for CN=<device_id>, EC P-256")]
    identity_key: Annotated[str, _pem(MAX_KEY_PEM, "TPM identity public key, SPKI")]
    identity_public: Annotated[
        str,
        Field(
            max_length=4 * MAX_TPM_BLOB // 3 + 4,
            pattern=_B64,
            description="the identity key's TPM2B_PUBLIC (base64): the cloud derives its TPM"
            " Name for credential activation",
        ),
    ] = ""
    ek_cert: Annotated[
        str, _pem(MAX_CERT_PEM, "the TPM's RSA-2048 EK certificate; empty when it has none", True)
    ] = ""
    created_at_ms: CreatedAt
    nonce: Nonce


class ActivationChallenge(_Canonical):
    """Cloud → device on ``fleet/v1/enroll/<claim id>/response``: a secret sealed by
    ``TPM2_MakeCredential`` to the EK of the certificate the request presented and to the
    Name of its identity key. Only that TPM, holding that key, can recover it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "credential_blob": "AEQAIA==",
                    "device_id": "pi-07",
                    "encrypted_secret": "AQA=",
                    "nonce": "ab" * 16,
                    "v": VERSION,
                }
            ]
        }
    )
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {"device_id": "bad_device_id"}

    device_id: DeviceId
    nonce: Annotated[str, Field(pattern=NONCE_RE.pattern, description="the request's nonce")]
    credential_blob: Annotated[
        str,
        Field(max_length=4 * MAX_TPM_BLOB // 3 + 4, pattern=_B64, description="TPM2B_ID_OBJECT"),
    ]
    encrypted_secret: Annotated[
        str,
        Field(
            max_length=4 * MAX_TPM_BLOB // 3 + 4, pattern=_B64, description="TPM2B_ENCRYPTED_SECRET"
        ),
    ]


class ActivationProof(_Canonical):
    """Device → cloud on ``fleet/v1/enroll/<claim id>/request``: the activated secret."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "claim_id": "0123456789abcdef",
                    "device_id": "pi-07",
                    "nonce": "ab" * 16,
                    "secret": "c2VjcmV0",
                    "v": VERSION,
                }
            ]
        }
    )
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {
        "device_id": "bad_device_id",
        "claim_id": "bad_claim_id",
    }

    device_id: DeviceId
    claim_id: Annotated[str, Field(pattern=topics.CLAIM_ID_RE.pattern, description="16 hex")]
    nonce: Annotated[str, Field(pattern=NONCE_RE.pattern, description="the request's nonce")]
    secret: Annotated[
        str, Field(max_length=4 * 64 // 3 + 4, pattern=_B64, description="the activated secret")
    ]


class RenewRequest(_Signed):
    """Device → cloud over its own mTLS session on ``fleet/v1/<device>/cert/request``:
    a fresh CSR signed by its TPM identity."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "created_at_ms": 1764000000000,
                    "csr": _EXAMPLE_CSR,
                    "device_id": "pi-07",
                    "kid": "0123456789abcdef",
                    "nonce": "ab" * 16,
                    "sig": _EXAMPLE_SIG,
                    "v": VERSION,
                }
            ]
        }
    )
    TAG: ClassVar[bytes] = RENEW_TAG
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {
        "device_id": "bad_device_id",
        "sig": "bad_signature",
    }

    device_id: DeviceId
    kid: Annotated[str, Field(pattern=KID_RE.pattern, description="the identity key's id")]
    csr: Annotated[str, _pem(MAX_CSR_PEM, "CSR for CN=<device_id>, EC P-256")]
    created_at_ms: CreatedAt
    nonce: Nonce


class ReenrollRequest(_Signed):
    """Device → cloud over the claim identity on ``fleet/v1/enroll/<channel>/request``
    when its certificate expired (offline past its lifetime) and its claim is used up:
    a fresh CSR signed by the TPM identity key the fleet registered at enrollment. No
    human in the loop; a revoked or unknown device is refused."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "channel": "0123456789abcdef",
                    "created_at_ms": 1764000000000,
                    "csr": _EXAMPLE_CSR,
                    "device_id": "pi-07",
                    "kid": "0123456789abcdef",
                    "nonce": "ab" * 16,
                    "sig": _EXAMPLE_SIG,
                    "v": VERSION,
                }
            ]
        }
    )
    TAG: ClassVar[bytes] = REENROLL_TAG
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {
        "device_id": "bad_device_id",
        "channel": "bad_claim_id",
        "sig": "bad_signature",
    }

    device_id: DeviceId
    channel: Annotated[
        str,
        Field(
            pattern=topics.CLAIM_ID_RE.pattern,
            description="16 hex, fresh per attempt: the enrollment topic and the client id",
        ),
    ]
    kid: Annotated[str, Field(pattern=KID_RE.pattern, description="the identity key's id")]
    csr: Annotated[str, _pem(MAX_CSR_PEM, "CSR for CN=<device_id>, EC P-256")]
    created_at_ms: CreatedAt
    nonce: Nonce


class CertResponse(_Canonical):
    """Cloud → device on ``fleet/v1/enroll/<claim id>/response`` (enrollment) or
    ``fleet/v1/<device>/cert/response`` (renewal): the issued certificate, or why none
    was issued."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "cert": "",
                    "device_id": "pi-07",
                    "nonce": "ab" * 16,
                    "not_after_ms": 0,
                    "reason": "claim_used",
                    "status": "rejected",
                    "v": VERSION,
                }
            ]
        }
    )

    FIELD_REASONS: ClassVar[Mapping[str, str]] = {"device_id": "bad_device_id"}

    device_id: DeviceId
    nonce: Annotated[str, Field(pattern=NONCE_RE.pattern, description="the request's nonce")]
    status: Literal["issued", "rejected"]
    reason: Annotated[str, Field(pattern=REASON_RE.pattern, description="why it was rejected")]
    cert: Annotated[str, _pem(MAX_CERT_PEM, "the issued certificate; empty when rejected", True)]
    not_after_ms: Annotated[UInt63, Field(description="the certificate's notAfter, Unix ms")]

    @model_validator(mode="after")
    def _issued_has_a_certificate(self) -> Self:
        if self.status == "issued" and not self.cert:
            raise ValueError("an issued response carries a certificate")
        return self


def new_nonce() -> str:
    return secrets.token_hex(16)


CHANNEL_TAG = b"sovereign-edge enroll channel v1\x00"


def session_channel(claim_id: str, token: str, nonce: str) -> str:
    """The enrollment channel of one request: its topic level and the claim holder's MQTT
    client id (the enrollment listener lets a client use only its own). 16 hex of
    HMAC-SHA256(token, tag || claim id || 0 || nonce): only the token's holder can name
    it, and a new nonce gives a new one, so another holder of the shared claim
    certificate can neither read an exchange nor take its session over (issue 9)."""
    msg = CHANNEL_TAG + claim_id.encode() + b"\x00" + nonce.encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()[:16]


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
    "MAX_MESSAGE_BYTES",
    "VERSION",
    "ActivationChallenge",
    "ActivationProof",
    "CertResponse",
    "Claim",
    "EnrollRequest",
    "ReenrollRequest",
    "RenewRequest",
    "check_csr",
    "check_issued",
    "key_id",
    "load_identity_key",
    "make_csr",
    "new_nonce",
    "token_hash",
]
