"""The replay buffer: kept samples and outgoing batches, behind one ``ReplayStore`` protocol.

Two implementations pass the same contract suite (tests/unit/test_replay_contract.py):
``SqliteReplayStore`` (the device's, alias ``ReplayBuffer``) and ``MemoryReplayStore``
(for tests and simulations).

Invariants of every store:
- a sample id is stored at most once; a batch, the samples it claims and the sequence
  counter move together, so a sample is never in two batches and a sequence number is
  never reused within the store's epoch;
- ``epoch()`` is drawn at random when the store is created and never changes; a new
  (wiped) store has a new one, so the cloud takes its sequence from 0 again (ADR 0017);
- every sample is charged ``sample_charge(features)`` bytes; ``stored_bytes()`` (samples +
  envelopes of unacknowledged batches) is kept at or below ``max_bytes`` by eviction,
  unless only samples of unacknowledged batches are left (in flight: never evicted);
- eviction removes samples of acknowledged batches first, oldest first, and only then
  unbatched ones, lowest selection priority first (audit, low_confidence, disagreement),
  oldest first: never a sample not yet uploaded while an uploaded one remains.

Invariants of the SQLite store:
- WAL mode with ``synchronous=FULL``: a call that returned has committed, and a committed
  sample survives power loss and SIGKILL (tests/faults/test_buffer_sigkill.py);
- a sample, its eviction victims, and a batch with its claims each commit in one
  transaction;
- features are encrypted at rest with AES-256-GCM under the TPM-sealed storage key
  (associated data = sample id), so an SD card taken from a device reveals nothing;
- the schema is versioned (``PRAGMA user_version``) and upgraded by the ordered
  ``MIGRATIONS`` of ``edge_daemon.buffer_schema``, each in its own transaction and
  logged in ``migrations``; a database newer than the code is refused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_daemon.buffer_schema import (
    migrate,
    new_epoch,
    priority,
    sample_charge,
)
from edge_daemon.errors import BufferError_
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES

log = logging.getLogger(__name__)

Features = npt.NDArray[np.float16]
NONCE_BYTES = 12


@dataclass(frozen=True)
class PendingBatch:
    batch_id: str
    seq: int
    envelope: bytes
    retry_delay_s: float | None = None  # set once the cloud deferred it (a ``retry`` ack)
    retry_due_ms: int | None = None  # when the backoff ends (wall clock)


class ReplayStore(Protocol):
    """What the daemon needs from a replay buffer. Every method is thread-safe."""

    max_bytes: int

    def add(self, meta: SampleMeta, features: Features) -> bool:
        """Store one sample and evict to budget; True if it is stored after the call."""

    def unbatched(self, limit: int) -> list[tuple[SampleMeta, Features]]:
        """Up to ``limit`` samples in no batch yet, oldest first."""

    def next_seq(self) -> int: ...

    def epoch(self) -> int:
        """This store's sequence epoch (random, fixed for its lifetime, never 0)."""

    def commit_batch(
        self, batch_id: str, seq: int, created_at_ms: int, envelope: bytes, sample_ids: list[str]
    ) -> None:
        """Record a sealed batch, claim its samples, advance the sequence; all or nothing."""

    def unacked(self) -> list[PendingBatch]: ...

    def mark_acked(self, batch_id: str) -> bool: ...

    def defer(self, batch_id: str, delay_s: float, due_ms: int) -> None:
        """Record a deferred batch's backoff (kept across restarts); no-op once acked."""
        ...

    def stored_bytes(self) -> int: ...

    def pending_bytes(self) -> int:
        """Bytes that only dropping not-yet-uploaded data could free."""

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def _features_bytes(features: Features) -> bytes:
    return np.asarray(features, dtype="<f2").tobytes()


def _features_from(plain: bytes) -> Features:
    return np.frombuffer(plain, dtype="<f2").reshape(N_BANDS, N_FRAMES)


# -- in memory ---------------------------------------------------------------


@dataclass
class _MemSample:
    meta: SampleMeta
    plain: bytes
    nbytes: int
    batch_id: str | None = None


@dataclass
class _MemBatch:
    seq: int
    envelope: bytes
    acked: bool = False
    retry: tuple[float, int] | None = None  # (delay s, due at ms)


class MemoryReplayStore:
    """The reference implementation: dicts in insertion order, no persistence."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._samples: dict[str, _MemSample] = {}
        self._batches: dict[str, _MemBatch] = {}
        self._next_seq = 0
        self._epoch = new_epoch()

    def add(self, meta: SampleMeta, features: Features) -> bool:
        plain = _features_bytes(features)
        with self._lock:
            if meta.sample_id in self._samples:
                return False
            self._samples[meta.sample_id] = _MemSample(meta, plain, sample_charge(len(plain)))
            self._evict()
            return meta.sample_id in self._samples

    def _stored(self) -> int:
        envelopes = sum(len(b.envelope) for b in self._batches.values() if not b.acked)
        return envelopes + sum(s.nbytes for s in self._samples.values())

    def _evict(self) -> None:
        excess = self._stored() - self.max_bytes
        if excess <= 0:
            return
        order = list(self._samples.values())  # insertion order = oldest first
        acked = [s for s in order if s.batch_id and self._batches[s.batch_id].acked]
        unsent = sorted(
            (s for s in order if s.batch_id is None), key=lambda s: priority(s.meta.reason)
        )
        victims = []
        for s in acked + unsent:  # sorted() is stable: oldest first within a priority
            if excess <= 0:
                break
            victims.append(s.meta.sample_id)
            excess -= s.nbytes
        for v in victims:
            del self._samples[v]
        log.debug("memory store over budget: evicted %d samples", len(victims))

    def unbatched(self, limit: int) -> list[tuple[SampleMeta, Features]]:
        with self._lock:
            rows = [s for s in self._samples.values() if s.batch_id is None][:limit]
            return [(s.meta, _features_from(s.plain)) for s in rows]

    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    def epoch(self) -> int:
        return self._epoch

    def commit_batch(
        self, batch_id: str, seq: int, created_at_ms: int, envelope: bytes, sample_ids: list[str]
    ) -> None:
        with self._lock:
            if seq != self._next_seq:
                raise BufferError_(f"sequence {seq} is not the next one ({self._next_seq})")
            if batch_id in self._batches:
                raise BufferError_(f"batch {batch_id} already exists")
            self._batches[batch_id] = _MemBatch(seq, bytes(envelope))
            for sid in sample_ids:
                s = self._samples.get(sid)
                if s is not None and s.batch_id is None:
                    s.batch_id = batch_id
            self._next_seq = seq + 1

    def unacked(self) -> list[PendingBatch]:
        with self._lock:
            out = [
                PendingBatch(k, b.seq, b.envelope, *(b.retry or (None, None)))
                for k, b in self._batches.items()
                if not b.acked
            ]
        return sorted(out, key=lambda p: p.seq)

    def defer(self, batch_id: str, delay_s: float, due_ms: int) -> None:
        with self._lock:
            b = self._batches.get(batch_id)
            if b is not None and not b.acked:
                b.retry = (delay_s, due_ms)

    def mark_acked(self, batch_id: str) -> bool:
        with self._lock:
            b = self._batches.get(batch_id)
            if b is None or b.acked:
                return False
            b.acked, b.envelope = True, b""
            return True

    def stored_bytes(self) -> int:
        with self._lock:
            return self._stored()

    def pending_bytes(self) -> int:
        with self._lock:
            envelopes = sum(len(b.envelope) for b in self._batches.values() if not b.acked)
            return envelopes + sum(
                s.nbytes
                for s in self._samples.values()
                if s.batch_id is None or not self._batches[s.batch_id].acked
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            acked = sum(b.acked for b in self._batches.values())
            return {
                "samples": len(self._samples),
                "batches": len(self._batches),
                "batches_acked": acked,
            }

    def close(self) -> None:
        pass


# -- SQLite: the store -------------------------------------------------------

_SAMPLE_COLUMNS = (
    "sample_id, captured_at_ms, stream_offset_s, predicted, score, model_sha256, reason"
)
_SAMPLE_FIELDS = tuple(c.strip() for c in _SAMPLE_COLUMNS.split(","))
_UNACKED_ENVELOPES = "SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM batches WHERE acked = 0"


class SqliteReplayStore:
    """The device's replay buffer: one SQLite file in WAL mode, features encrypted."""

    def __init__(self, path: Path, storage_key: bytes, max_bytes: int = 64 * 1024 * 1024) -> None:
        if len(storage_key) != 32:
            raise BufferError_("storage key must be 32 bytes")
        self.path = path
        self.max_bytes = max_bytes
        self._aead = AESGCM(storage_key)
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._db.enable_wal()
            self._db.execute("PRAGMA synchronous=FULL")
            migrate(self._db)
        except (OSError, sqlite3.Error) as e:
            raise BufferError_(f"cannot open replay buffer {path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        return list(self._db.execute(sql, params).fetchall())

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> int:
        return int(self._db.execute(sql, params).fetchone()[0])

    def _write(self, what: str, body: Callable[[], object]) -> object:
        """Run ``body`` in one IMMEDIATE transaction; errors become ``BufferError_``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = body()
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite has already rolled back after SQLITE_FULL / SQLITE_IOERR; a
                    # second ROLLBACK would replace "database or disk is full" with
                    # "no transaction is active"
                    if self._db.conn.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise BufferError_(f"cannot {what}: {e}") from e
        return result

    # -- samples -------------------------------------------------------------

    def add(self, meta: SampleMeta, features: Features) -> bool:
        plain = _features_bytes(features)
        nonce = os.urandom(NONCE_BYTES)
        payload = self._aead.encrypt(nonce, plain, meta.sample_id.encode())
        row = (
            meta.sample_id, meta.captured_at_ms, meta.stream_offset_s, meta.predicted, meta.score,
            meta.model_sha256, meta.reason, nonce, payload,
            sample_charge(len(plain)), priority(meta.reason),
        )  # fmt: skip

        def insert() -> bool:
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO samples({_SAMPLE_COLUMNS}, nonce, payload, nbytes, priority)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            if cur.rowcount != 1:
                return False
            rowid = cur.lastrowid
            return rowid not in self._evict()

        return bool(self._write("store sample", insert))

    def _evict(self) -> set[int]:
        total = self._one("SELECT COALESCE(SUM(nbytes), 0) FROM samples") + self._one(
            _UNACKED_ENVELOPES
        )
        excess = total - self.max_bytes
        if excess <= 0:
            return set()
        rows = self._q(
            "SELECT s.rowid, s.nbytes FROM samples s LEFT JOIN batches b USING(batch_id)"
            " WHERE b.acked = 1 OR s.batch_id IS NULL"
            " ORDER BY (s.batch_id IS NULL), (CASE WHEN s.batch_id IS NULL THEN s.priority END),"
            " s.rowid"
        )
        victims: list[int] = []
        for rowid, size in rows:
            if excess <= 0:
                break
            victims.append(int(rowid))
            excess -= int(size)
        self._db.conn.executemany("DELETE FROM samples WHERE rowid = ?", [(v,) for v in victims])
        if excess > 0:
            log.warning("replay buffer over budget by %d bytes: only in-flight data left", excess)
        log.debug("replay buffer over budget: evicted %d samples", len(victims))
        return set(victims)

    def unbatched(self, limit: int) -> list[tuple[SampleMeta, Features]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SAMPLE_COLUMNS}, nonce, payload FROM samples WHERE batch_id IS NULL"
                " ORDER BY rowid LIMIT ?",
                (limit,),
            ).fetchall()
        out = []
        for r in rows:
            meta = SampleMeta(**dict(zip(_SAMPLE_FIELDS, r[:7], strict=True)))
            try:
                plain = self._aead.decrypt(r[7], r[8], meta.sample_id.encode())
            except InvalidTag as e:
                raise BufferError_(f"sample {meta.sample_id} fails authentication") from e
            out.append((meta, _features_from(plain)))
        return out

    # -- batches -------------------------------------------------------------

    def next_seq(self) -> int:
        with self._lock:
            return self._one("SELECT value FROM meta WHERE key='next_seq'")

    def epoch(self) -> int:
        with self._lock:
            return self._one("SELECT value FROM meta WHERE key='epoch'")

    def commit_batch(
        self, batch_id: str, seq: int, created_at_ms: int, envelope: bytes, sample_ids: list[str]
    ) -> None:
        def commit() -> None:
            expected = self._one("SELECT value FROM meta WHERE key='next_seq'")
            if seq != expected:
                raise BufferError_(f"sequence {seq} is not the next one ({expected})")
            if self._one("SELECT COUNT(*) FROM batches WHERE batch_id = ?", (batch_id,)):
                raise BufferError_(f"batch {batch_id} already exists")
            self._db.execute(
                "INSERT INTO batches(batch_id, seq, created_at_ms, envelope) VALUES (?,?,?,?)",
                (batch_id, seq, created_at_ms, envelope),
            )
            self._db.conn.executemany(
                "UPDATE samples SET batch_id = ? WHERE sample_id = ? AND batch_id IS NULL",
                [(batch_id, s) for s in sample_ids],
            )
            self._db.execute("UPDATE meta SET value = ? WHERE key='next_seq'", (seq + 1,))

        self._write("commit batch", commit)

    def unacked(self) -> list[PendingBatch]:
        with self._lock:
            rows = self._q(
                "SELECT batch_id, seq, envelope, retry_delay_s, retry_due_ms FROM batches"
                " WHERE acked = 0 ORDER BY seq"
            )
        return [PendingBatch(str(r[0]), int(r[1]), bytes(r[2]), r[3], r[4]) for r in rows]

    def defer(self, batch_id: str, delay_s: float, due_ms: int) -> None:
        def record() -> None:
            self._db.execute(
                "UPDATE batches SET retry_delay_s = ?, retry_due_ms = ?"
                " WHERE batch_id = ? AND acked = 0",
                (delay_s, due_ms, batch_id),
            )

        self._write("record a retry backoff", record)

    def mark_acked(self, batch_id: str) -> bool:
        def ack() -> bool:
            cur = self._db.execute(
                "UPDATE batches SET acked = 1, envelope = x'', acked_at_ms = ?"
                " WHERE batch_id = ? AND acked = 0",
                (int(time.time() * 1000), batch_id),
            )
            return cur.rowcount == 1

        return bool(self._write("mark batch acknowledged", ack))

    def stored_bytes(self) -> int:
        with self._lock:
            return self._one("SELECT COALESCE(SUM(nbytes), 0) FROM samples") + self._one(
                _UNACKED_ENVELOPES
            )

    def pending_bytes(self) -> int:
        with self._lock:
            return self._one(
                "SELECT COALESCE(SUM(s.nbytes), 0) FROM samples s LEFT JOIN batches b"
                " USING(batch_id) WHERE s.batch_id IS NULL OR b.acked = 0"
            ) + self._one(_UNACKED_ENVELOPES)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "samples": self._one("SELECT COUNT(*) FROM samples"),
                "batches": self._one("SELECT COUNT(*) FROM batches"),
                "batches_acked": self._one("SELECT COUNT(*) FROM batches WHERE acked = 1"),
            }


ReplayBuffer = SqliteReplayStore  # the name the daemon and older tests use
