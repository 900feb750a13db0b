"""The replay buffer's SQLite schema, its versioned migrations and the byte charges.

Owns ``MIGRATIONS``: an ordered list of ``(version, title, step)``. Invariants: version 1
is the schema the walking skeleton created, verbatim; steps are only ever appended,
never edited; ``migrate`` applies each pending step in its own ``BEGIN IMMEDIATE``
transaction together with its ``PRAGMA user_version`` bump and a row in
``migrations``, so a crash mid-upgrade leaves the previous version intact; a database
newer than the code is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import sqlite_utils

from edge_daemon.errors import BufferError_
from fleet_protocol.features import N_BANDS, N_FRAMES

log = logging.getLogger(__name__)

TAG_BYTES = 16
ROW_OVERHEAD_BYTES = 256  # metadata, nonce and index share of one sample row
FEATURE_BYTES = N_BANDS * N_FRAMES * 2
# Higher is kept longer when unsent samples must be evicted; unknown reasons rank lowest.
REASON_PRIORITY = {"audit": 0, "low_confidence": 1}


def sample_charge(n_feature_bytes: int = FEATURE_BYTES) -> int:
    """Bytes one sample counts against the byte budget (same in every store)."""
    return n_feature_bytes + TAG_BYTES + ROW_OVERHEAD_BYTES


def priority(reason: str) -> int:
    return REASON_PRIORITY.get(reason, -1)


# Version 1, exactly as the walking skeleton created it (tests/unit/test_replay_buffer.py
# keeps a verbatim copy and upgrades a database built from it).
_V1_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS samples (
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
)""",
    "CREATE INDEX IF NOT EXISTS samples_batch ON samples(batch_id)",
    """CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', 0)",
)


def _v1_initial(db: sqlite_utils.Database) -> None:
    for statement in _V1_STATEMENTS:
        db.execute(statement)


def _v2_budget_and_priority(db: sqlite_utils.Database) -> None:
    """Byte charge and selection priority per sample (budgeted, priority-aware eviction);
    ack time per batch; a log of applied migrations."""
    samples, batches = db.table("samples"), db.table("batches")
    samples.add_column("nbytes", int, not_null_default=0)
    samples.add_column("priority", int, not_null_default=-1)
    batches.add_column("acked_at_ms", int)
    db.execute(
        "UPDATE samples SET nbytes = LENGTH(payload) + ?, priority = CASE reason"
        + "".join(f" WHEN '{r}' THEN {p}" for r, p in REASON_PRIORITY.items())
        + " ELSE -1 END",
        (ROW_OVERHEAD_BYTES,),
    )
    samples.create_index(["batch_id", "priority"], index_name="samples_eviction")


def _v3_no_device_labels(db: sqlite_utils.Database) -> None:
    """A device has no labels (they come from outside, joined in the cloud): drop the
    simulated-feedback column; samples kept for a disagreement become low_confidence."""
    db.execute(
        "UPDATE samples SET reason = 'low_confidence', priority = ? WHERE reason = 'disagreement'",
        (REASON_PRIORITY["low_confidence"],),
    )
    db.execute("ALTER TABLE samples DROP COLUMN feedback")


def new_epoch() -> int:
    """A random sequence epoch in 1..2**62 (0 is the epoch of header-v1 envelopes)."""
    return (int.from_bytes(os.urandom(8), "big") >> 2) | 1


def _v4_sequence_epoch(db: sqlite_utils.Database) -> None:
    """The buffer's sequence epoch (docs/adr/0017): drawn once, when the buffer is created
    or upgraded; a wiped device gets a new buffer, so a new epoch, and counts from 0."""
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('epoch', ?)", (new_epoch(),))


def _v5_retry_backoff(db: sqlite_utils.Database) -> None:
    """A batch the cloud deferred (a ``retry`` ack) keeps its backoff across restarts:
    the delay and when it is due (wall clock, capped by the delay when read back)."""
    batches = db.table("batches")
    batches.add_column("retry_delay_s", float)
    batches.add_column("retry_due_ms", int)


MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite_utils.Database], None]], ...] = (
    (1, "initial schema", _v1_initial),
    (2, "byte charge, priority, ack time", _v2_budget_and_priority),
    (3, "no device-side labels", _v3_no_device_labels),
    (4, "sequence epoch", _v4_sequence_epoch),
    (5, "retry backoff", _v5_retry_backoff),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(db: sqlite_utils.Database, target: int = SCHEMA_VERSION) -> int:
    """Apply the steps above the database's version up to ``target``; return the new version.

    The connection must be in autocommit mode (``isolation_level=None``): each step runs
    in its own ``BEGIN IMMEDIATE`` transaction with its ``user_version`` bump.
    """
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise BufferError_(f"buffer schema {version} is newer than this daemon ({SCHEMA_VERSION})")
    for step_version, title, step in MIGRATIONS:
        if step_version <= version or step_version > target:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute(
                "CREATE TABLE IF NOT EXISTS migrations"
                " (version INTEGER PRIMARY KEY, title TEXT NOT NULL, applied_at_ms INTEGER NOT NULL)"
            )
            db.execute(
                "INSERT INTO migrations VALUES (?, ?, ?)",
                (step_version, title, int(time.time() * 1000)),
            )
            db.execute(f"PRAGMA user_version = {int(step_version)}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("replay buffer schema migrated %d -> %d (%s)", version, step_version, title)
        version = step_version
    return int(version)
