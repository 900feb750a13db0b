"""The OTA repository: versions only rise; a rollback is a roll-forward carrying the old
adapter; its state comes from signed metadata only (issue 9: an insider who can write the
directory cannot steer what the HSM signs)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cloud_sidecar.errors import RepositoryError, TrainingError
from cloud_sidecar.ota_repo import OtaRepository
from cloud_sidecar.train import Gated, check_signable, merge_for_gate
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
    repo = OtaRepository(tmp_path, "stable", PEM)
    assert [_add(repo, b"one").adapter_version, _add(repo, b"two").adapter_version] == [1, 2]
    assert _verify(repo, current=1).version == 2


def test_rollback_republishes_the_earlier_artifact_under_a_higher_version(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable", PEM)
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
    repo = OtaRepository(tmp_path, "stable", PEM)
    _add(repo, b"adapter-one")
    with pytest.raises(ValueError, match="no published adapter"):
        repo.roll_back(7, expires_days=7, **SIGN)  # type: ignore[arg-type]


def _forge(path: Path, **signed_edits: object) -> None:
    """What an insider with write access does: edit the signed part, keep the signature."""
    doc = json.loads(path.read_bytes())
    doc["signed"].update(signed_edits)
    path.write_bytes(ota.canonical(doc))


def test_an_unsigned_higher_version_on_disk_does_not_set_the_next_version(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable", PEM)
    _add(repo, b"one")
    _forge(tmp_path / "metadata" / "targets.json", version=99)
    with pytest.raises(RepositoryError, match=r"targets\.json"):
        _add(repo, b"two")
    assert not (tmp_path / "metadata" / "2.targets.json").exists()


def test_a_rollback_target_edited_on_disk_is_refused_and_nothing_is_signed(
    tmp_path: Path,
) -> None:
    repo = OtaRepository(tmp_path, "stable", PEM)
    first = _add(repo, b"adapter-one")
    _add(repo, b"adapter-two")
    evil = b"evil adapter"
    (tmp_path / "targets" / first.name).write_bytes(evil)
    doc = json.loads((tmp_path / "metadata" / "1.targets.json").read_bytes())
    entry = doc["signed"]["targets"][first.name]
    entry["length"], entry["hashes"]["sha256"] = len(evil), hashlib.sha256(evil).hexdigest()
    (tmp_path / "metadata" / "1.targets.json").write_bytes(ota.canonical(doc))
    signed: list[bytes] = []
    with pytest.raises(RepositoryError, match=r"1\.targets\.json"):
        repo.roll_back(1, expires_days=7, keyid=SIGN["keyid"], sign_digest=signed.append)  # type: ignore[arg-type]
    assert signed == []


def test_a_rollback_artifact_swapped_on_disk_is_refused(tmp_path: Path) -> None:
    repo = OtaRepository(tmp_path, "stable", PEM)
    first = _add(repo, b"adapter-one")
    (tmp_path / "targets" / first.name).write_bytes(b"adapter-0ne")
    with pytest.raises(RepositoryError, match="adapter v1"):
        repo.roll_back(1, expires_days=7, **SIGN)  # type: ignore[arg-type]


def test_a_signature_by_another_key_is_never_written(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    repo = OtaRepository(tmp_path, "stable", PEM)
    with pytest.raises(RepositoryError, match=r"does not say|not signed"):
        repo.add_adapter(
            b"x",
            base_model_sha256="0" * 64,
            adapter_version=1,
            cohort="all",
            expires_days=7,
            keyid=SIGN["keyid"],  # type: ignore[arg-type]
            sign_digest=lambda d: other.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
        )
    assert list((tmp_path / "metadata").iterdir()) == []


# -- train.py: sign the exact bytes that were gated ---------------------------------------


def test_a_base_swapped_after_pretraining_is_neither_gated_nor_signed(tmp_path: Path) -> None:
    fp32 = tmp_path / "base.fp32.onnx"
    fp32.write_bytes(b"a base someone replaced")
    base = SimpleNamespace(
        onnx_fp32=fp32, sha256_fp32="0" * 64, calibration=tmp_path / "base.calib.npy"
    )
    with pytest.raises(TrainingError, match="does not match the base card"):
        merge_for_gate(base, b"artifact")  # type: ignore[arg-type]


def test_only_the_artifact_and_base_the_gate_judged_can_be_signed() -> None:
    gated = Gated(hashlib.sha256(b"gated").hexdigest(), "1" * 64, "2" * 64)
    check_signable(gated, b"gated", "2" * 64)
    with pytest.raises(RepositoryError, match="not the one the gate judged"):
        check_signable(gated, b"swapped", "2" * 64)
    with pytest.raises(RepositoryError, match="base"):
        check_signable(gated, b"gated", "3" * 64)
