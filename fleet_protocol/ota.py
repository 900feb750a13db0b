"""OTA targets metadata: building, signing hooks and verification (sans-IO).

The document has TUF's ``targets`` shape (``{"signed": {...}, "signatures": [...]}``,
canonical JSON, ``ecdsa-sha2-nistp256`` = ECDSA over SHA-256 of the canonical
``signed`` bytes), so the standard TUF layout of a later issue reuses the keys and
signatures. Verification takes bytes and trusted state, and returns a decision or
raises ``MetadataError``; fetching and persisting are the caller's job.

Invariants enforced by ``verify_targets``: byte cap; exactly the trusted key signs;
``_type`` is ``targets``; not expired (freeze attack); version never below the
trusted one (rollback attack). ``verify_artifact`` checks length before hashing.
Whatever the bytes hold (lone surrogates such as ``"\\ud800"``, huge numbers, deep
nesting, wrong types) ``verify_targets`` raises only ``ProtocolError`` subclasses:
canonicalising the unauthenticated ``signed`` part to hash it is the first thing that
touches it, and ``canonical`` raises ``MetadataError`` for what UTF-8 cannot hold.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleet_protocol.errors import MalformedError, MetadataError, TooLargeError
from fleet_protocol.wire import canonical_json

SPEC_VERSION = "1.0.31"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one path component, never . or ..


@dataclass(frozen=True)
class OtaLimits:
    max_metadata: int = 64 * 1024
    max_artifact: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class TargetInfo:
    name: str
    length: int
    sha256: str
    base_model_sha256: str
    adapter_format: str
    cohort: str
    adapter_version: int


@dataclass(frozen=True)
class VerifiedTargets:
    version: int
    expires: datetime
    targets: tuple[TargetInfo, ...]


def canonical(obj: Any) -> bytes:
    """Canonical JSON of ``obj``; ``MetadataError`` for what has no UTF-8 encoding.

    ``wire.canonical_json`` refuses lone surrogates, NaN and infinities and too deep
    nesting with ``MalformedError``; a document carrying one is malformed metadata.
    """
    try:
        return canonical_json(obj)
    except MalformedError as e:
        raise MetadataError(f"metadata cannot be canonicalised: {e}", reason="malformed") from e


def build_targets(
    *,
    version: int,
    expires: datetime,
    targets: tuple[TargetInfo, ...],
    keyid: str,
    sign_digest: Callable[[bytes], bytes],
) -> bytes:
    """Signed targets metadata; ``sign_digest`` signs a SHA-256 digest (HSM) and returns DER."""
    signed = {
        "_type": "targets",
        "spec_version": SPEC_VERSION,
        "version": version,
        "expires": expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "targets": {
            t.name: {
                "length": t.length,
                "hashes": {"sha256": t.sha256},
                "custom": {
                    "base_model_sha256": t.base_model_sha256,
                    "adapter_format": t.adapter_format,
                    "cohort": t.cohort,
                    "adapter_version": t.adapter_version,
                },
            }
            for t in targets
        },
    }
    sig = sign_digest(hashlib.sha256(canonical(signed)).digest())
    return canonical({"signed": signed, "signatures": [{"keyid": keyid, "sig": sig.hex()}]})


def _target(name: str, obj: Any) -> TargetInfo:
    try:
        custom = obj["custom"]
        info = TargetInfo(
            name=name,
            length=obj["length"],
            sha256=obj["hashes"]["sha256"],
            base_model_sha256=custom["base_model_sha256"],
            adapter_format=custom["adapter_format"],
            cohort=custom["cohort"],
            adapter_version=custom["adapter_version"],
        )
    except (KeyError, TypeError) as e:
        raise MetadataError(f"target {name[:64]!r} lacks a field: {e}") from e
    if not _NAME.fullmatch(name) or ".." in name:
        raise MetadataError("target name has forbidden characters", reason="bad_path")
    if not isinstance(info.length, int) or isinstance(info.length, bool) or info.length <= 0:
        raise MetadataError("target length must be a positive integer")
    for h in (info.sha256, info.base_model_sha256):
        if not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise MetadataError("target hashes must be 64 lowercase hex characters")
    if not isinstance(info.adapter_version, int) or info.adapter_version < 0:
        raise MetadataError("adapter_version must be a non-negative integer")
    if not isinstance(info.cohort, str) or not isinstance(info.adapter_format, str):
        raise MetadataError("cohort and adapter_format must be strings")
    return info


def verify_targets(
    data: bytes,
    *,
    trusted_key_pem: bytes,
    trusted_keyid: str,
    current_version: int,
    now: datetime,
    limits: OtaLimits = OtaLimits(),
) -> VerifiedTargets:
    verified = verify_signed_targets(
        data, trusted_key_pem=trusted_key_pem, trusted_keyid=trusted_keyid, limits=limits
    )
    if verified.version < current_version:
        raise MetadataError(
            f"version {verified.version} is older than trusted {current_version}",
            reason="rollback",
        )
    if verified.expires <= now:
        raise MetadataError(f"metadata expired at {verified.expires.isoformat()}", reason="expired")
    return verified


def verify_signed_targets(
    data: bytes,
    *,
    trusted_key_pem: bytes,
    trusted_keyid: str,
    limits: OtaLimits = OtaLimits(),
) -> VerifiedTargets:
    """Signature, type and field checks only, without freshness (expiry, rollback).

    For the repository's own history (``cloud_sidecar.ota_repo``), whose earlier
    versions have expired; a device always calls ``verify_targets``.
    """
    if len(data) > limits.max_metadata:
        raise TooLargeError(f"metadata of {len(data)} bytes exceeds {limits.max_metadata}")
    try:
        doc = json.loads(data)
        signed = doc["signed"]
        sigs = doc["signatures"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise MetadataError(f"metadata is not a signed document: {e}") from e
    if not isinstance(signed, dict) or not isinstance(sigs, list):
        raise MetadataError("metadata has the wrong shape")
    digest = hashlib.sha256(canonical(signed)).digest()
    key = serialization.load_pem_public_key(trusted_key_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise MetadataError("trusted OTA key is not an EC key")
    good = False
    for s in sigs:
        if not isinstance(s, dict) or s.get("keyid") != trusted_keyid:
            continue
        try:
            key.verify(
                bytes.fromhex(str(s.get("sig"))), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
            )
            good = True
        except (InvalidSignature, ValueError):
            continue
    if not good:
        raise MetadataError("no valid signature by the trusted OTA key", reason="bad_signature")
    if signed.get("_type") != "targets":
        raise MetadataError("metadata is not of type targets")
    version = signed.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetadataError("version must be a positive integer")
    try:
        expires = datetime.strptime(str(signed.get("expires")), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC
        )
    except ValueError as e:
        raise MetadataError("expires is not an ISO-8601 UTC time") from e
    raw_targets = signed.get("targets")
    if not isinstance(raw_targets, dict):
        raise MetadataError("targets must be an object")
    targets = tuple(_target(str(n), t) for n, t in sorted(raw_targets.items()))
    return VerifiedTargets(version=version, expires=expires, targets=targets)


def verify_artifact(data: bytes, target: TargetInfo, limits: OtaLimits = OtaLimits()) -> None:
    if target.length > limits.max_artifact or len(data) != target.length:
        raise MetadataError(f"artifact length {len(data)} != {target.length}", reason="bad_length")
    if hashlib.sha256(data).hexdigest() != target.sha256:
        raise MetadataError("artifact hash does not match its metadata", reason="bad_hash")


def rollout_bucket(device_id: str) -> int:
    """The device's rollout bucket, 0..99: a deterministic hash of its id (both sides agree).

    A target signed with ``rollout_percent = p`` is for the devices whose bucket is below
    ``p``; widening a rollout raises ``p`` in new signed targets metadata.
    """
    digest = hashlib.sha256(b"sovereign-edge/rollout/v1\0" + device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100
