"""OTA targets metadata: signature, rollback, freeze, and artifact checks (software keys)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import MetadataError, TooLargeError

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def _key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    k = ec.generate_private_key(ec.SECP256R1())
    pem = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return k, pem


def _target(data: bytes = b"adapter") -> ota.TargetInfo:
    return ota.TargetInfo(
        name="adapter-v1.safetensors",
        length=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        base_model_sha256="0" * 64,
        adapter_format=ADAPTER_FORMAT,
        cohort="all",
        adapter_version=1,
    )


def _signed(key: ec.EllipticCurvePrivateKey, pem: bytes, version: int = 2, days: int = 7) -> bytes:
    return ota.build_targets(
        version=version,
        expires=NOW + timedelta(days=days),
        targets=(_target(),),
        keyid=key_id_from_pem(pem),
        sign_digest=lambda d: key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
    )


def _verify(data: bytes, pem: bytes, current: int = 1) -> ota.VerifiedTargets:
    return ota.verify_targets(
        data,
        trusted_key_pem=pem,
        trusted_keyid=key_id_from_pem(pem),
        current_version=current,
        now=NOW,
    )


def test_valid_metadata_verifies_and_lists_the_target() -> None:
    key, pem = _key()
    v = _verify(_signed(key, pem), pem)
    assert v.version == 2
    assert v.targets == (_target(),)


def test_metadata_signed_by_another_key_is_rejected() -> None:
    key, pem = _key()
    _, other_pem = _key()
    with pytest.raises(MetadataError) as e:
        _verify(_signed(key, pem), other_pem)
    assert e.value.reason == "bad_signature"


def test_edited_metadata_is_rejected() -> None:
    key, pem = _key()
    doc = json.loads(_signed(key, pem))
    doc["signed"]["targets"]["adapter-v1.safetensors"]["length"] = 999
    with pytest.raises(MetadataError):
        _verify(json.dumps(doc).encode(), pem)


def test_older_version_than_trusted_is_a_rollback() -> None:
    key, pem = _key()
    with pytest.raises(MetadataError) as e:
        _verify(_signed(key, pem, version=2), pem, current=3)
    assert e.value.reason == "rollback"


def test_expired_metadata_is_a_freeze_attack() -> None:
    key, pem = _key()
    with pytest.raises(MetadataError) as e:
        _verify(_signed(key, pem, days=-1), pem)
    assert e.value.reason == "expired"


def test_oversized_metadata_is_rejected_before_parsing() -> None:
    _, pem = _key()
    with pytest.raises(TooLargeError):
        _verify(b"{" * (ota.OtaLimits().max_metadata + 1), pem)


def test_artifact_with_wrong_hash_or_length_is_rejected() -> None:
    ota.verify_artifact(b"adapter", _target())
    with pytest.raises(MetadataError):
        ota.verify_artifact(b"adaptor", _target())
    with pytest.raises(MetadataError):
        ota.verify_artifact(b"adapter!", _target())


def test_signature_scheme_is_ecdsa_over_sha256_of_canonical_signed() -> None:
    key, pem = _key()
    doc = json.loads(_signed(key, pem))
    pub = serialization.load_pem_public_key(pem)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(
        bytes.fromhex(doc["signatures"][0]["sig"]),
        ota.canonical(doc["signed"]),
        ec.ECDSA(hashes.SHA256()),
    )


def test_a_target_name_that_is_not_one_safe_path_component_is_refused() -> None:
    key, pem = _key()
    for bad in ("..", ".", "../x", ".hidden", "a..b"):
        data = ota.build_targets(
            version=2,
            expires=NOW + timedelta(days=7),
            targets=(dataclasses.replace(_target(), name=bad),),
            keyid=key_id_from_pem(pem),
            sign_digest=lambda d: key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
        )
        with pytest.raises(MetadataError) as e:
            _verify(data, pem)
        assert e.value.reason == "bad_path"
