"""The OTA repository: versions only rise; a rollback is a roll-forward carrying the old adapter."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cloud_sidecar.ota_repo import OtaRepository
from fleet_protocol import ota
from fleet_protocol.envelope import key_id_from_pem

KEY = ec.generate_private_key(ec.SECP256R1())
PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
SIGN = {
    "keyid": key_id_from_pem(PEM),
    "sign_digest": lambda d: KEY.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
}


def _add(repo: OtaRepository, artifact: bytes) -> ota.TargetInfo:
    pub = repo.add_adapter(
        artifact,
        base_model_sha256="0" * 64,
        adapter_version=repo.next_adapter_version(),
        cohort="all",
        expires_days=7,
        **SIGN,  # type: ignore[arg-type]
    )
    return pub.target


def _verify(repo: OtaRepository, current: int) -> ota.VerifiedTargets:
    data = (repo.dir / "metadata" / "targets.json").read_bytes()
    return ota.verify_targets(
        data,
        trusted_key_pem=PEM,
        trusted_keyid=key_id_from_pem(PEM),
        current_version=current,
        now=datetime.now(UTC),
    )


def test_each_publication_raises_metadata_and_adapter_versions(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable")
    assert [_add(repo, b"one").adapter_version, _add(repo, b"two").adapter_version] == [1, 2]
    assert _verify(repo, current=1).version == 2


def test_rollback_republishes_the_earlier_artifact_under_a_higher_version(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable")
    first = _add(repo, b"adapter-one")
    _add(repo, b"adapter-two")
    pub = repo.roll_back(1, expires_days=7, **SIGN)  # type: ignore[arg-type]
    assert pub.version == 3 and pub.target.adapter_version == 3
    assert pub.artifact == b"adapter-one" and pub.target.sha256 == first.sha256
    verified = _verify(repo, current=2)  # a device on v2 accepts it: no version went down
    assert verified.targets[0].adapter_version == 3
    assert (
        json.loads((tmp_path / "metadata" / "2.targets.json").read_bytes())["signed"]["version"]
        == 2
    )


def test_rollback_to_an_unknown_version_is_refused(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable")
    _add(repo, b"adapter-one")
    with pytest.raises(ValueError, match="no published adapter"):
        repo.roll_back(7, expires_days=7, **SIGN)  # type: ignore[arg-type]


def test_concurrent_publications_never_sign_two_documents_with_one_version(tmp_path: Path) -> None:
    import threading

    repo = OtaRepository(tmp_path, "stable")
    versions: list[int] = []

    def add(i: int) -> None:
        pub = repo.add_adapter(
            bytes([i]) * 10,
            base_model_sha256="0" * 64,
            adapter_version=100 + i,
            cohort="all",
            expires_days=7,
            **SIGN,  # type: ignore[arg-type]
        )
        versions.append(pub.version)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))
