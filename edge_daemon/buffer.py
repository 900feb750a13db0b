"""The replay buffer: kept samples and outgoing batches in SQLite (WAL).

Invariants:
- sample features are encrypted at rest with AES-256-GCM under the TPM-sealed storage
  key (associated data = sample id), so an SD card taken from a device reveals nothing;
- a sample and its metadata are committed in one transaction; a batch, the samples it
  claims and the sequence counter move together in one transaction, so a crash never
  leaves a sample in two batches or a sequence number reused;
- ``synchronous=FULL`` in WAL mode: a committed sample survives power loss;
- eviction when over ``max_bytes`` removes acknowledged samples first, oldest first,
  and never an unacknowledged one while an acknowledged one remains.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_daemon.errors import BufferError_
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_FRAMES, N_MELS

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
_SCHEMA = """
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


@dataclass(frozen=True)
class PendingBatch:
    batch_id: str
    seq: int
    envelope: bytes


class ReplayBuffer:
    def __init__(self, path: Path, storage_key: bytes, max_bytes: int = 64 * 1024 * 1024) -> None:
        if len(storage_key) != 32:
            raise BufferError_("storage key must be 32 bytes")
        self.path = path
        self.max_bytes = max_bytes
        self._aead = AESGCM(storage_key)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as e:
            raise BufferError_(f"cannot open replay buffer {path}: {e}") from e

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise BufferError_(
                f"buffer schema {version} is newer than this daemon ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            self._db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- samples -------------------------------------------------------------

    def add(self, meta: SampleMeta, features: npt.NDArray[np.float16]) -> bool:
        """Store one sample; False if its id is already stored. Evicts if over budget."""
        plain = np.asarray(features, dtype="<f2").tobytes()
        nonce = os.urandom(12)
        payload = self._aead.encrypt(nonce, plain, meta.sample_id.encode())
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO samples(sample_id, captured_at_ms, stream_offset_s, predicted,"
                    " score, feedback, model_sha256, reason, nonce, payload) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        meta.sample_id,
                        meta.captured_at_ms,
                        meta.stream_offset_s,
                        meta.predicted,
                        meta.score,
                        meta.feedback,
                        meta.model_sha256,
                        meta.reason,
                        nonce,
                        payload,
                    ),
                )
                added = cur.rowcount == 1
                if added:
                    self._evict()
                return added
            except sqlite3.Error as e:
                raise BufferError_(f"cannot store sample: {e}") from e

    def _evict(self) -> None:
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM samples"
        ).fetchone()
        if total <= self.max_bytes:
            return
        excess = total - self.max_bytes
        # acknowledged first (oldest first), then unbatched oldest; never a sample in an unacked batch
        rows = self._db.execute(
            "SELECT s.rowid, LENGTH(s.payload) FROM samples s LEFT JOIN batches b USING(batch_id)"
            " WHERE b.acked = 1 OR s.batch_id IS NULL"
            " ORDER BY (s.batch_id IS NULL), s.rowid"
        ).fetchall()
        victims: list[int] = []
        for rowid, size in rows:
            if excess <= 0:
                break
            victims.append(rowid)
            excess -= size
        self._db.executemany("DELETE FROM samples WHERE rowid = ?", [(v,) for v in victims])
        log.info("buffer over budget: evicted %d samples", len(victims))

    def unbatched(self, limit: int) -> list[tuple[SampleMeta, npt.NDArray[np.float16]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, captured_at_ms, stream_offset_s, predicted, score, feedback,"
                " model_sha256, reason, nonce, payload FROM samples WHERE batch_id IS NULL"
                " ORDER BY rowid LIMIT ?",
                (limit,),
            ).fetchall()
        out = []
        for r in rows:
            meta = SampleMeta(*r[:8])
            try:
                plain = self._aead.decrypt(r[8], r[9], meta.sample_id.encode())
            except InvalidTag as e:
                raise BufferError_(f"sample {meta.sample_id} fails authentication") from e
            feats = np.frombuffer(plain, dtype="<f2").reshape(N_MELS, N_FRAMES)
            out.append((meta, feats))
        return out

    # -- batches -------------------------------------------------------------

    def next_seq(self) -> int:
        with self._lock:
            (seq,) = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        return int(seq)

    def commit_batch(
        self, batch_id: str, seq: int, created_at_ms: int, envelope: bytes, sample_ids: list[str]
    ) -> None:
        """Record a sealed batch, claim its samples and advance the sequence, atomically."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                (expected,) = self._db.execute(
                    "SELECT value FROM meta WHERE key='next_seq'"
                ).fetchone()
                if seq != expected:
                    raise BufferError_(f"sequence {seq} is not the next one ({expected})")
                self._db.execute(
                    "INSERT INTO batches(batch_id, seq, created_at_ms, envelope) VALUES (?,?,?,?)",
                    (batch_id, seq, created_at_ms, envelope),
                )
                self._db.executemany(
                    "UPDATE samples SET batch_id = ? WHERE sample_id = ? AND batch_id IS NULL",
                    [(batch_id, s) for s in sample_ids],
                )
                self._db.execute("UPDATE meta SET value = ? WHERE key='next_seq'", (seq + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unacked(self) -> list[PendingBatch]:
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id, seq, envelope FROM batches WHERE acked = 0 ORDER BY seq"
            ).fetchall()
        return [PendingBatch(r[0], r[1], bytes(r[2])) for r in rows]

    def mark_acked(self, batch_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE batches SET acked = 1, envelope = x'' WHERE batch_id = ? AND acked = 0",
                (batch_id,),
            )
            return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            (samples,) = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
            (batches,) = self._db.execute("SELECT COUNT(*) FROM batches").fetchone()
            (acked,) = self._db.execute("SELECT COUNT(*) FROM batches WHERE acked = 1").fetchone()
        return {"samples": samples, "batches": batches, "batches_acked": acked}
