"""HSM-signed audit checkpoints: forged signatures, rewritten chains and truncation are caught.

The signer here is a software P-256 key with the HSM's interface (sign a SHA-256
digest, return DER); tests/faults/test_hsm_outage.py signs with the real SoftHSM key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from cloud_sidecar.__main__ import EXIT_AUDIT, EXIT_OK, main
from cloud_sidecar.audit import (
    CHECKPOINT_KIND,
    GENESIS,
    AuditLog,
    _entry_hash,
    verify,
    verify_log,
)
from cloud_sidecar.errors import AuditError


class FakeHsm:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def sign_digest(self, digest: bytes) -> bytes:
        assert len(digest) == 32
        return self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture
def hsm() -> FakeHsm:
    return FakeHsm()


@pytest.fixture
def log(tmp_path: Path, hsm: FakeHsm) -> AuditLog:
    """3 entries, checkpoint (seq 3), 2 entries, checkpoint (seq 6), 1 entry: 8 entries."""
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1", tmp_path / "elsewhere" / "cp.jsonl")
    for i in range(3):
        audit.append("ingest.stored", f"pi-0{i}", batch_id=f"b{i}")
    audit.checkpoint(hsm.sign_digest, "kid-1")
    audit.append("dataset.built", "ds-1")
    audit.append("train.finished", "run-1")
    audit.checkpoint(hsm.sign_digest, "kid-1")
    audit.append("gate.decision", "run-1", passed=True)
    return audit


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines(keepends=True)


def _rechain(lines: list[str]) -> list[str]:
    """What an insider without the HSM can do: recompute every hash after an edit."""
    out, prev = [], GENESIS
    for seq, line in enumerate(lines):
        entry = json.loads(line)
        entry.pop("hash")
        entry["seq"], entry["prev"] = seq, prev
        prev = _entry_hash(prev, entry)
        out.append(json.dumps({**entry, "hash": prev}) + "\n")
    return out


def test_checkpoint_entry_signs_the_head_before_it(log: AuditLog, hsm: FakeHsm) -> None:
    entries = [json.loads(line) for line in _lines(log.path)]
    cp = entries[3]
    assert cp["kind"] == CHECKPOINT_KIND and cp["region"] == "eu-central-1"
    assert (cp["details"]["head_seq"], cp["details"]["head"]) == (2, entries[2]["hash"])
    report = verify_log(log.path, hsm.pem(), log.checkpoint_path)
    assert (report.entries, report.checkpoints, report.last_checkpoint_seq) == (8, 2, 6)
    assert report.signatures_checked and report.external_checkpoints == 2


def test_checkpoints_are_also_written_to_the_separate_file(log: AuditLog) -> None:
    external = [json.loads(line) for line in _lines(log.checkpoint_path)]
    assert [c["head_seq"] for c in external] == [2, 5]
    assert all(c["region"] == "eu-central-1" and c["key_id"] == "kid-1" for c in external)


def test_checkpoint_signed_by_another_key_is_detected(tmp_path: Path, hsm: FakeHsm) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    audit.append("ingest.stored", "pi-00")
    audit.checkpoint(FakeHsm().sign_digest, "kid-1")  # a forger's key
    assert verify(audit.path) == 2  # the chain itself is intact
    with pytest.raises(AuditError, match="line 2: checkpoint signature does not verify"):
        verify(audit.path, hsm.pem())


def test_forged_signature_bytes_are_detected(log: AuditLog, hsm: FakeHsm) -> None:
    lines = _lines(log.path)
    entry = json.loads(lines[6])
    sig = bytearray(bytes.fromhex(entry["details"]["sig"]))
    sig[-3] ^= 0x40
    entry["details"]["sig"] = sig.hex()
    lines[6] = json.dumps(entry) + "\n"
    log.path.write_text("".join(_rechain(lines)))
    with pytest.raises(AuditError, match="line 7: checkpoint signature"):
        verify(log.path, hsm.pem())


def test_rewritten_and_rehashed_chain_passes_the_hashes_but_not_the_signatures(
    log: AuditLog, hsm: FakeHsm
) -> None:
    lines = _lines(log.path)
    lines[1] = lines[1].replace("pi-01", "pi-66")
    log.path.write_text("".join(_rechain(lines)))
    with pytest.raises(AuditError, match="line 4: checkpoint does not name the entry before it"):
        verify(log.path)
    # the insider also rewrites the checkpoint heads: only the HSM signature is left to fail
    fixed = _rechain(lines)
    for i in (3, 6):
        entry = json.loads(fixed[i])
        entry["details"]["head"] = json.loads(fixed[i - 1])["hash"]
        fixed[i] = json.dumps(entry) + "\n"
        fixed = _rechain(fixed)
    log.path.write_text("".join(fixed))
    assert verify(log.path) == 8
    with pytest.raises(AuditError, match="line 4: checkpoint signature does not verify"):
        verify(log.path, hsm.pem())


def test_truncation_after_a_checkpoint_is_caught_by_the_checkpoint_kept_elsewhere(
    log: AuditLog, hsm: FakeHsm
) -> None:
    log.path.write_text("".join(_lines(log.path)[:5]))  # drops the second checkpoint and more
    assert verify(log.path, hsm.pem()) == 5  # a truncated chain is still a valid chain
    with pytest.raises(
        AuditError, match=r"checkpoint entry 6 is missing, the log ends at 4: .*truncated"
    ):
        verify_log(log.path, hsm.pem(), log.checkpoint_path)


def test_log_rebuilt_from_scratch_differs_from_the_checkpoint_kept_elsewhere(
    log: AuditLog, hsm: FakeHsm, tmp_path: Path
) -> None:
    forged = AuditLog(tmp_path / "forged.jsonl", "eu-central-1")
    for i in range(8):
        forged.append("ingest.stored", f"pi-9{i}")
    with pytest.raises(AuditError, match="entry 2 differs from the signed checkpoint"):
        verify_log(forged.path, hsm.pem(), log.checkpoint_path)


def test_forged_checkpoint_in_the_separate_file_is_detected(log: AuditLog, hsm: FakeHsm) -> None:
    lines = _lines(log.checkpoint_path)
    cp = json.loads(lines[0])
    cp["sig"] = FakeHsm().sign_digest(hashlib.sha256(b"x").digest()).hex()
    log.checkpoint_path.write_text(json.dumps(cp) + "\n" + lines[1])
    with pytest.raises(AuditError, match=r"cp\.jsonl line 1: checkpoint signature"):
        verify_log(log.path, hsm.pem(), log.checkpoint_path)


@pytest.mark.parametrize(
    "tamper",
    ["edit", "delete", "reorder", "delete_checkpoint"],
)
def test_tampering_around_checkpoints_is_detected(log: AuditLog, hsm: FakeHsm, tamper: str) -> None:
    lines = _lines(log.path)
    if tamper == "edit":
        lines[4] = lines[4].replace("ds-1", "ds-2")
    elif tamper == "delete":
        del lines[4]
    elif tamper == "reorder":
        lines[4], lines[5] = lines[5], lines[4]
    else:
        del lines[3]
    log.path.write_text("".join(lines))
    with pytest.raises(AuditError):
        verify(log.path, hsm.pem())


def test_untrusted_key_of_the_wrong_kind_is_refused(log: AuditLog) -> None:
    with pytest.raises(AuditError, match="PEM"):
        verify(log.path, b"not a key")


def test_two_writers_on_one_file_extend_one_chain(tmp_path: Path, hsm: FakeHsm) -> None:
    """A CLI command (fleet, audit checkpoint) and a running serve share the log."""
    a = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    b = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    for i in range(3):
        a.append("ingest.stored", f"a{i}")
        b.append("fleet.registered", f"b{i}")
    b.checkpoint(hsm.sign_digest, "kid-1")
    a.append("ingest.stored", "a3")
    assert verify_log(a.path, hsm.pem(), b.checkpoint_path).entries == 8


def _cli(*argv: Any) -> int:
    return main(["audit", "verify", *map(str, argv)])


def test_cli_verify_reports_checkpoints_and_fails_on_truncation(
    log: AuditLog, hsm: FakeHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "signing.pub.pem"
    pem.write_bytes(hsm.pem())
    assert _cli(log.path, "--public-key", pem, "--checkpoints", log.checkpoint_path) == EXIT_OK
    out = capsys.readouterr().out
    assert "8 entries" in out and "signatures verified" in out and "last at entry 6" in out
    log.path.write_text("".join(_lines(log.path)[:6]))
    assert _cli(log.path, "--public-key", pem) == EXIT_OK
    assert _cli(log.path, "--public-key", pem, "--checkpoints", log.checkpoint_path) == EXIT_AUDIT
