"""The SQLite replay buffer (real SQLite, software storage key): what only it promises —
encryption at rest, persistence, WAL, and schema migrations from a version-1 database.
Behaviour shared with the in-memory store is in test_replay_contract.py."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_daemon import buffer_schema
from edge_daemon.buffer import ReplayBuffer
from edge_daemon.buffer_schema import SCHEMA_VERSION, migrate, sample_charge
from edge_daemon.errors import BufferError_
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES

KEY = bytes(range(32))

# Verbatim copy of the schema the walking skeleton (schema version 1) created; do not edit.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    rowid INTEGER PRIMARY KEY,
    sample_id TEXT NOT NULL UNIQUE,
    captured_at_ms INTEGER NOT NULL,
    stream_offset_s REAL NOT NULL,
    predicted TEXT NOT NULL,
    score REAL NOT NULL,
    feedback TEXT,
    model_sha256 TEXT NOT NULL,
    reason TEXT NOT NULL,
    nonce BLOB NOT NULL,
    payload BLOB NOT NULL,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS samples_batch ON samples(batch_id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', 0);
"""


def _meta(i: int, reason: str = "low_confidence") -> SampleMeta:
    return SampleMeta.model_validate(
        {
            "sample_id": f"{i:032x}",
            "captured_at_ms": 1_700_000_000_000 + i,
            "stream_offset_s": float(i),
            "predicted": "horn",
            "score": 0.4,
            "model_sha256": "ab" * 32,
            "reason": reason,
        }
    )


def _feats(i: int) -> np.ndarray:
    return np.full((N_BANDS, N_FRAMES), i, dtype=np.float16)


def _write_v1_database(path: Path) -> None:
    """A database as the version-1 code left it: 3 samples, one acked and one unacked batch."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(f"BEGIN; {V1_SCHEMA} PRAGMA user_version=1; COMMIT;")
    aead = AESGCM(KEY)
    # v1 rows carried the simulated feedback label; "disagreement" was a reason then
    for i, (reason, batch_id) in enumerate(
        [("audit", "a" * 32), ("low_confidence", "b" * 32), ("disagreement", None)]
    ):
        m, nonce = _meta(i), os.urandom(12)
        payload = aead.encrypt(nonce, _feats(i).astype("<f2").tobytes(), m.sample_id.encode())
        db.execute(
            "INSERT INTO samples(sample_id, captured_at_ms, stream_offset_s, predicted, score,"
            " feedback, model_sha256, reason, nonce, payload, batch_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (m.sample_id, m.captured_at_ms, m.stream_offset_s, m.predicted, m.score, "siren",
             m.model_sha256, reason, nonce, payload, batch_id),
        )  # fmt: skip
    db.execute("INSERT INTO batches VALUES (?, 0, 1, x'', 1)", ("a" * 32,))
    db.execute("INSERT INTO batches VALUES (?, 1, 2, x'0102', 0)", ("b" * 32,))
    db.execute("UPDATE meta SET value = 2 WHERE key = 'next_seq'")
    db.close()


def test_samples_survive_reopen_and_decrypt(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    assert buf.add(_meta(1), _feats(1))
    buf.close()
    again = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    [(meta, feats)] = again.unbatched(10)
    assert meta == _meta(1)
    assert np.array_equal(feats, _feats(1))


def test_features_are_not_stored_in_clear(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    marker = np.full((N_BANDS, N_FRAMES), 1234.0, dtype=np.float16)
    buf.add(_meta(1), marker)
    buf.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert marker.tobytes()[:64] not in raw


def test_wrong_storage_key_cannot_read_samples(tmp_path: Path) -> None:
    ReplayBuffer(tmp_path / "b.sqlite3", KEY).add(_meta(1), _feats(1))
    with pytest.raises(BufferError_):
        ReplayBuffer(tmp_path / "b.sqlite3", os.urandom(32)).unbatched(10)


def test_eviction_drops_acknowledged_samples_before_unsent_ones(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY, max_bytes=3 * sample_charge())
    for i in range(2):
        buf.add(_meta(i), _feats(i))
    buf.commit_batch("a" * 32, 0, 1, b"", [_meta(0).sample_id, _meta(1).sample_id])
    buf.mark_acked("a" * 32)
    for i in range(2, 4):
        buf.add(_meta(i), _feats(i))
    unsent = {m.sample_id for m, _ in buf.unbatched(10)}
    assert unsent == {_meta(2).sample_id, _meta(3).sample_id}
    assert buf.counts()["samples"] == 3


def test_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    ReplayBuffer(tmp_path / "b.sqlite3", KEY).close()
    with sqlite3.connect(tmp_path / "b.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_version_1_database_upgrades_keeping_samples_batches_and_sequence(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    _write_v1_database(path)
    buf = ReplayBuffer(path, KEY)
    [(meta, feats)] = buf.unbatched(10)
    assert meta == _meta(2, "low_confidence")  # v3: a device keeps no labels
    assert np.array_equal(feats, _feats(2))
    assert buf.next_seq() == 2
    assert [p.batch_id for p in buf.unacked()] == ["b" * 32]
    assert buf.counts() == {"samples": 3, "batches": 2, "batches_acked": 1}
    assert buf.stored_bytes() == 3 * sample_charge() + 2  # backfilled charges + envelope
    assert buf.pending_bytes() == 2 * sample_charge() + 2
    buf.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("SELECT version FROM migrations").fetchall() == [(2,), (3,), (4,), (5,)]
        assert db.execute("SELECT priority FROM samples ORDER BY rowid").fetchall() == [
            (0,),
            (1,),
            (1,),
        ]
        columns = [r[1] for r in db.execute("PRAGMA table_info(samples)")]
        assert "feedback" not in columns
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_upgraded_database_evicts_the_acked_v1_sample_first(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    _write_v1_database(path)
    buf = ReplayBuffer(path, KEY, max_bytes=3 * sample_charge() + 2)
    assert buf.add(_meta(9, "audit"), _feats(9))
    assert [p.batch_id for p in buf.unacked()] == ["b" * 32]
    assert {m.sample_id for m, _ in buf.unbatched(10)} == {_meta(2).sample_id, _meta(9).sample_id}
    assert buf.counts()["samples"] == 3  # sample 0 (acked batch a) went


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "b.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(BufferError_, match="newer"):
        ReplayBuffer(tmp_path / "b.sqlite3", KEY)


def test_failed_migration_step_leaves_the_previous_version_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ReplayBuffer(tmp_path / "b.sqlite3", KEY).close()

    def broken(db: sqlite_utils.Database) -> None:
        db.table("samples").add_column("half_done", int)
        raise RuntimeError("power cut")

    steps = (*buffer_schema.MIGRATIONS, (SCHEMA_VERSION + 1, "broken", broken))
    monkeypatch.setattr(buffer_schema, "MIGRATIONS", steps)
    monkeypatch.setattr(buffer_schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    conn = sqlite3.connect(tmp_path / "b.sqlite3", isolation_level=None)
    with pytest.raises(RuntimeError):
        migrate(sqlite_utils.Database(conn, execute_plugins=False), target=SCHEMA_VERSION + 1)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(samples)")]
    assert "half_done" not in columns
    conn.close()


def test_epoch_survives_reopen_and_an_upgraded_v1_database_gets_one(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    epoch = buf.epoch()
    buf.close()
    again = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    assert again.epoch() == epoch != 0
    again.close()
    _write_v1_database(tmp_path / "v1.sqlite3")
    old = ReplayBuffer(tmp_path / "v1.sqlite3", KEY)
    assert old.epoch() not in (0, epoch) and old.next_seq() == 2
    old.close()
