"""The upload envelope: one device-signed, hybrid-encrypted batch (sans-IO).

Owns: the wire format, its byte caps and field rules, sealing on the device and
parsing, signature verification and opening in the cloud. Bytes in, an
``Envelope`` / plaintext or a ``ProtocolError`` out; no sockets, no files. Key
custody stays with the caller: signing and unwrapping are callables (TPM, HSM).

Wire::

    b"SEV1" | u32 BE header_len | header | u16 BE sig_len | signature (DER) | ciphertext

Invariants:
- the header is canonical JSON (sorted keys, separators ``,`` ``:``, UTF-8) with
  exactly the fields of ``EnvelopeHeader``; a non-canonical header is malformed, so
  one batch has exactly one byte representation;
- the header bytes are the AES-256-GCM associated data, and the device's ECDSA
  P-256 signature covers SHA-256(b"SEV1" || u32 header_len || header || ciphertext):
  no header or ciphertext byte can change undetected; the signature is strict DER
  with a low S (``fleet_protocol.low_s``: ``seal`` normalises, ``parse`` refuses the
  other form), so no relay can re-encode an envelope into a second valid one;
- the per-batch AES key is random, used once, and travels only RSA-OAEP-wrapped
  for the cloud's unwrap key (docs/adr/0002-wrap-and-signature-mechanisms.md);
- ``parse`` checks every cap before reading further and raises only
  ``ProtocolError`` subclasses, whatever the input;
- header version 2 adds ``epoch``: the device's sequence epoch, a random number its
  replay buffer draws when it is created (a wiped and re-enrolled device starts a new
  epoch and counts ``seq`` from 0 again; docs/adr/0017). Version 1 headers (no
  ``epoch``) still parse, with epoch 0; ``seal`` writes version 2.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleet_protocol import low_s
from fleet_protocol.errors import (
    DecryptError,
    MalformedError,
    ProtocolError,
    SignatureError,
    TooLargeError,
    UnsupportedAlgorithmError,
)

MAGIC = b"SEV1"
VERSION = 2
VERSIONS = (1, 2)  # header versions parse accepts; 1 has no epoch
AEAD_ALG = "A256GCM"
WRAP_ALG = "RSA-OAEP-SHA1"
SIG_ALG = "ECDSA-P256-SHA256"

AES_KEY_BYTES = 32
NONCE_BYTES = 12
GCM_TAG_BYTES = 16
MIN_WRAPPED_KEY_BYTES = 256  # RSA-2048 .. RSA-4096 moduli
MAX_WRAPPED_KEY_BYTES = 512
MAX_INT = 2**63 - 1

DEVICE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HEX32_RE = re.compile(r"[0-9a-f]{32}")
_KID_RE = re.compile(r"[0-9a-f]{16}")
_FIELDS_V1 = frozenset(
    {"v", "device", "batch_id", "seq", "created_at_ms", "aead", "wrap", "sig"}
    | {"kid_wrap", "kid_sig", "wrapped_key", "nonce"}
)
_FIELDS = {1: _FIELDS_V1, 2: _FIELDS_V1 | {"epoch"}}
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


@dataclass(frozen=True)
class EnvelopeLimits:
    """Byte caps applied by ``parse`` (and by ``seal`` to what it produces)."""

    max_total: int = 8 * 1024 * 1024
    max_header: int = 4096
    max_signature: int = 80


@dataclass(frozen=True)
class EnvelopeHeader:
    """The checked header fields; ``wrapped_key`` and ``nonce`` are decoded bytes."""

    device: str
    batch_id: str
    seq: int
    created_at_ms: int
    kid_wrap: str
    kid_sig: str
    wrapped_key: bytes
    nonce: bytes
    epoch: int = 0
    v: int = VERSION
    aead: str = AEAD_ALG
    wrap: str = WRAP_ALG
    sig: str = SIG_ALG

    def canonical_bytes(self) -> bytes:
        """The header as canonical JSON, exactly as it travels and is authenticated."""
        doc: dict[str, Any] = {
            "v": self.v,
            "device": self.device,
            "batch_id": self.batch_id,
            "seq": self.seq,
            "created_at_ms": self.created_at_ms,
            "aead": self.aead,
            "wrap": self.wrap,
            "sig": self.sig,
            "kid_wrap": self.kid_wrap,
            "kid_sig": self.kid_sig,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode("ascii"),
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
        }
        if self.v >= 2:
            doc["epoch"] = self.epoch
        return _canonical_json(doc)


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope: structure and fields checked, signature not yet verified."""

    header: EnvelopeHeader
    header_bytes: bytes
    signature: bytes
    ciphertext: bytes

    def signed_digest(self) -> bytes:
        """SHA-256(b"SEV1" || u32 header_len || header || ciphertext): what the device signs."""
        return _signed_digest(self.header_bytes, self.ciphertext)


def key_id_from_pem(public_key_pem: bytes) -> str:
    """Key id: first 16 hex chars of SHA-256 over the key's SubjectPublicKeyInfo DER."""
    der = _load_public_key(public_key_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def seal(
    plaintext: bytes,
    *,
    device: str,
    batch_id: str,
    seq: int,
    created_at_ms: int,
    wrap_public_key_pem: bytes,
    kid_wrap: str,
    kid_sig: str,
    sign_digest: Callable[[bytes], bytes],
    limits: EnvelopeLimits = EnvelopeLimits(),
    epoch: int = 0,
) -> bytes:
    """Encrypt ``plaintext`` for the cloud's unwrap key and sign it with ``sign_digest``.

    ``sign_digest`` gets the 32-byte SHA-256 digest and returns a DER ECDSA P-256
    signature (the TPM). ``kid_wrap`` must be the id of ``wrap_public_key_pem``.
    """
    wrap_key = _load_public_key(wrap_public_key_pem)
    if not isinstance(wrap_key, rsa.RSAPublicKey):
        raise UnsupportedAlgorithmError(f"{WRAP_ALG} needs an RSA public key")
    if key_id_from_pem(wrap_public_key_pem) != kid_wrap:
        raise MalformedError("kid_wrap is not the id of the given wrap public key")
    aes_key = AESGCM.generate_key(bit_length=AES_KEY_BYTES * 8)
    header = EnvelopeHeader(
        device=device,
        batch_id=batch_id,
        seq=seq,
        created_at_ms=created_at_ms,
        kid_wrap=kid_wrap,
        kid_sig=kid_sig,
        wrapped_key=wrap_key.encrypt(aes_key, _OAEP),
        nonce=os.urandom(NONCE_BYTES),
        epoch=epoch,
    )
    header_bytes = header.canonical_bytes()
    _check_header(_decode_header(header_bytes))  # same rules as the receiver
    if len(header_bytes) > limits.max_header:
        raise TooLargeError(f"header is {len(header_bytes)} bytes > {limits.max_header}")
    ciphertext = AESGCM(aes_key).encrypt(header.nonce, plaintext, header_bytes)
    signature = low_s.normalize(sign_digest(_signed_digest(header_bytes, ciphertext)))
    if not 0 < len(signature) <= limits.max_signature:
        raise MalformedError(f"signer returned a {len(signature)}-byte signature")
    _check_der_signature(signature)
    out = b"".join(
        (
            MAGIC,
            struct.pack(">I", len(header_bytes)),
            header_bytes,
            struct.pack(">H", len(signature)),
            signature,
            ciphertext,
        )
    )
    if len(out) > limits.max_total:
        raise TooLargeError(f"envelope would be {len(out)} bytes > {limits.max_total}")
    return out


def parse(data: bytes, limits: EnvelopeLimits = EnvelopeLimits()) -> Envelope:
    """Check structure, caps and header fields; raise only ``ProtocolError`` subclasses."""
    if len(data) > limits.max_total:
        raise TooLargeError(f"envelope is {len(data)} bytes > {limits.max_total}")
    if len(data) < len(MAGIC) + 4:
        raise MalformedError("envelope truncated before the header length")
    if data[: len(MAGIC)] != MAGIC:
        if data[:3] == MAGIC[:3]:
            raise UnsupportedAlgorithmError(f"unsupported envelope version {data[:4]!r}")
        raise MalformedError("not an envelope (bad magic)")
    pos = len(MAGIC)
    (header_len,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if header_len > limits.max_header:
        raise TooLargeError(f"header is {header_len} bytes > {limits.max_header}")
    if len(data) < pos + header_len + 2:
        raise MalformedError("envelope truncated in the header")
    header_bytes = data[pos : pos + header_len]
    pos += header_len
    (sig_len,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if sig_len > limits.max_signature:
        raise TooLargeError(f"signature is {sig_len} bytes > {limits.max_signature}")
    if sig_len == 0:
        raise MalformedError("empty signature")
    if len(data) < pos + sig_len + GCM_TAG_BYTES:
        raise MalformedError("envelope truncated in the signature or ciphertext")
    signature = data[pos : pos + sig_len]
    ciphertext = data[pos + sig_len :]
    _check_der_signature(signature)
    header = _check_header(_decode_header(header_bytes))
    return Envelope(header, header_bytes, signature, ciphertext)


def verify_signature(envelope: Envelope, device_public_key_pem: bytes) -> None:
    """Raise ``SignatureError`` unless the device key signed this header and ciphertext."""
    key = _load_public_key(device_public_key_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise UnsupportedAlgorithmError(f"{SIG_ALG} needs an EC P-256 public key")
    if key_id_from_pem(device_public_key_pem) != envelope.header.kid_sig:
        raise SignatureError("kid_sig does not name this device key")
    try:
        key.verify(envelope.signature, envelope.signed_digest(), _ECDSA)
    except (InvalidSignature, ValueError) as e:
        raise SignatureError("device signature does not verify") from e


def open_envelope(envelope: Envelope, unwrap: Callable[[bytes], bytes]) -> bytes:
    """Unwrap the batch key with ``unwrap`` and decrypt (call ``verify_signature`` first).

    ``unwrap(wrapped_key)`` returns the 32-byte AES key (RSA-OAEP-SHA1 decrypt in
    the HSM). It signals "not decryptable with this key" by raising ``ValueError``
    (as ``cryptography`` does) or a ``ProtocolError``; both become ``DecryptError``.
    Any other exception (e.g. the HSM being unreachable) propagates unchanged, so a
    caller can retry instead of rejecting the batch.
    """
    try:
        aes_key = unwrap(envelope.header.wrapped_key)
    except DecryptError:
        raise
    except (ValueError, ProtocolError) as e:
        raise DecryptError(f"batch key does not unwrap: {e}") from e
    if len(aes_key) != AES_KEY_BYTES:
        raise DecryptError(f"unwrapped key is {len(aes_key)} bytes, expected 32")
    try:
        return AESGCM(aes_key).decrypt(
            envelope.header.nonce, envelope.ciphertext, envelope.header_bytes
        )
    except InvalidTag as e:
        raise DecryptError("AEAD authentication failed") from e


# -- internals ------------------------------------------------------------------------


def _load_public_key(pem: bytes) -> PublicKeyTypes:
    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise MalformedError(f"not a PEM public key: {e}") from e


def _canonical_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _signed_digest(header_bytes: bytes, ciphertext: bytes) -> bytes:
    h = hashlib.sha256(MAGIC)
    h.update(struct.pack(">I", len(header_bytes)))
    h.update(header_bytes)
    h.update(ciphertext)
    return h.digest()


def _reject_constant(name: str) -> Any:
    raise MalformedError(f"header contains non-finite number {name}")


def _decode_header(header_bytes: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(header_bytes.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedError(f"header is not UTF-8 JSON: {e}") from e
    if not isinstance(doc, dict):
        raise MalformedError("header is not a JSON object")
    try:
        canonical = _canonical_json(doc)
    except (ValueError, RecursionError) as e:
        raise MalformedError(f"header cannot be re-encoded: {e}") from e
    if canonical != header_bytes:
        raise MalformedError("header is not canonical JSON")
    return doc


def _int_field(doc: dict[str, Any], name: str) -> int:
    value = doc[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise MalformedError(f"{name} must be an integer in 0..2**63-1")
    return value


def _str_field(doc: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = doc[name]
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise MalformedError(f"{name} has the wrong form")
    return value


def _alg_field(doc: dict[str, Any], name: str, expected: str) -> str:
    value = doc[name]
    if not isinstance(value, str):
        raise MalformedError(f"{name} must be a string")
    if value != expected:
        raise UnsupportedAlgorithmError(f"{name} {value[:40]!r} is not supported")
    return value


def _b64_field(doc: dict[str, Any], name: str, lo: int, hi: int) -> bytes:
    value = doc[name]
    if not isinstance(value, str) or len(value) > 4 * ((hi + 2) // 3):
        raise MalformedError(f"{name} must be a base64 string of {lo}..{hi} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise MalformedError(f"{name} is not base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != value or not lo <= len(raw) <= hi:
        raise MalformedError(f"{name} must be canonical base64 of {lo}..{hi} bytes")
    return raw


def _check_header(doc: dict[str, Any]) -> EnvelopeHeader:
    v = doc.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MalformedError("v must be an integer")
    if v not in VERSIONS:
        raise UnsupportedAlgorithmError(f"header version {v} is not supported")
    keys, fields = set(doc), _FIELDS[v]
    if keys != fields:
        missing = sorted(fields - keys)
        extra = sorted(k[:40] for k in keys - fields)
        raise MalformedError(f"header fields wrong: missing {missing}, unexpected {extra}")
    return EnvelopeHeader(
        v=v,
        epoch=_int_field(doc, "epoch") if v >= 2 else 0,
        device=_str_field(doc, "device", DEVICE_RE),
        batch_id=_str_field(doc, "batch_id", _HEX32_RE),
        seq=_int_field(doc, "seq"),
        created_at_ms=_int_field(doc, "created_at_ms"),
        aead=_alg_field(doc, "aead", AEAD_ALG),
        wrap=_alg_field(doc, "wrap", WRAP_ALG),
        sig=_alg_field(doc, "sig", SIG_ALG),
        kid_wrap=_str_field(doc, "kid_wrap", _KID_RE),
        kid_sig=_str_field(doc, "kid_sig", _KID_RE),
        wrapped_key=_b64_field(doc, "wrapped_key", MIN_WRAPPED_KEY_BYTES, MAX_WRAPPED_KEY_BYTES),
        nonce=_b64_field(doc, "nonce", NONCE_BYTES, NONCE_BYTES),
    )


def _check_der_signature(signature: bytes) -> None:
    """Strict DER and low S (``fleet_protocol.low_s``): one encoding per envelope."""
    low_s.check(signature)
