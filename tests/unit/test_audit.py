"""The hash-chained audit log: verify detects every kind of tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sidecar.audit import AuditLog, verify
from cloud_sidecar.errors import AuditError


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    for i in range(5):
        log.append("ingest.stored", f"pi-0{i}", batch_id=f"b{i}")
    return log.path


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines(keepends=True)


def test_intact_chain_verifies_and_counts_entries(log_path: Path) -> None:
    assert verify(log_path) == 5


def test_reopened_log_continues_the_chain(log_path: Path) -> None:
    AuditLog(log_path, "eu-central-1").append("train.finished", "run-1")
    assert verify(log_path) == 6


def test_every_entry_records_its_region(log_path: Path) -> None:
    assert {json.loads(line)["region"] for line in _lines(log_path)} == {"eu-central-1"}


def test_edited_entry_is_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2] = lines[2].replace("pi-02", "pi-99")
    log_path.write_text("".join(lines))
    with pytest.raises(AuditError, match="line 3"):
        verify(log_path)


def test_deleted_entry_is_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[1]
    log_path.write_text("".join(lines))
    with pytest.raises(AuditError, match="line 2"):
        verify(log_path)


def test_reordered_entries_are_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    log_path.write_text("".join(lines))
    with pytest.raises(AuditError):
        verify(log_path)


def test_recomputed_hash_after_edit_still_breaks_the_next_link(log_path: Path) -> None:
    from cloud_sidecar.audit import _entry_hash

    lines = _lines(log_path)
    entry = json.loads(lines[1])
    entry.pop("hash")
    entry["subject"] = "pi-77"
    entry["hash"] = _entry_hash(entry["prev"], entry)
    lines[1] = json.dumps(entry) + "\n"
    log_path.write_text("".join(lines))
    with pytest.raises(AuditError, match="line 3"):
        verify(log_path)
