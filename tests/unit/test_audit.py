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


# -- torn tail (a crash or a full disk mid-append; docs/adr/0017) -------------------------


@pytest.mark.parametrize(
    "torn",
    [
        b'{"seq":5,"ts":17000',  # a write cut short
        b"\0" * 4096,  # zero-filled blocks after a crash
        b'{"seq":5,"ts":17000\n\0\0\0\n',  # both, over two lines
    ],
)
def test_a_torn_last_line_is_cut_kept_aside_and_audited_and_the_chain_goes_on(
    log_path: Path, torn: bytes
) -> None:
    with open(log_path, "ab") as f:
        f.write(torn)
    reopened = AuditLog(log_path, "eu-central-1")  # what a restarted sidecar does
    reopened.append("sidecar.started", "serve")
    assert verify(log_path) == 7
    recovered, started = (json.loads(x) for x in _lines(log_path)[-2:])
    assert recovered["kind"] == "audit.recovered" and started["kind"] == "sidecar.started"
    assert recovered["details"]["cut_bytes"] == len(torn)
    kept = log_path.with_name(recovered["details"]["kept_in"])
    assert kept.read_bytes() == torn


def test_a_complete_last_entry_missing_only_its_newline_is_kept(log_path: Path) -> None:
    log_path.write_bytes(log_path.read_bytes()[:-1])
    AuditLog(log_path, "eu-central-1").append("sidecar.started", "serve")
    assert verify(log_path) == 7
    assert json.loads(_lines(log_path)[-2])["details"]["cut_bytes"] == 0


def test_a_whole_log_that_is_one_torn_line_restarts_the_chain_on_the_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":0,"ts"')
    AuditLog(path, "eu-central-1").append("sidecar.started", "serve")
    assert verify(path) == 2
    assert json.loads(_lines(path)[0])["kind"] == "audit.recovered"


def test_an_edited_last_entry_is_tampering_not_a_torn_write(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace("pi-04", "pi-99")
    log_path.write_text("".join(lines))
    with pytest.raises(AuditError, match="modified"):
        AuditLog(log_path, "eu-central-1").append("sidecar.started", "serve")
    assert "".join(_lines(log_path)) == "".join(lines)  # nothing cut
