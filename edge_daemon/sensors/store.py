"""The ``telemetry`` table: sensor readings kept on the device beside the replay buffer.

Owns one table in the replay buffer's SQLite file (``state_dir/buffer.sqlite3``); it never
touches the buffer's tables or its ``user_version`` (the buffer's schema migrations are
its own). Readings are levels and temperatures, not audio or features, so they are
stored in clear.

Invariants: WAL mode, ``synchronous=FULL``, one transaction per telemetry message (all
of its readings or none); at most ``max_rows`` rows, the oldest deleted first; a row
records whether it was published, so what a broker outage held back is sent later
(``unpublished``/``mark_published``, used by ``resend.py``). Thread-safe (one lock, one
connection).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from edge_daemon.errors import BufferError_
from fleet_protocol.telemetry import Reading, Telemetry

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    period_ms INTEGER NOT NULL,
    sensor TEXT NOT NULL,
    quantity TEXT NOT NULL,
    unit TEXT NOT NULL,
    value REAL NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS telemetry_unpublished ON telemetry (published, id);
"""


class TelemetryStore:
    def __init__(self, path: Path, max_rows: int) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=10, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise BufferError_(f"{path}: cannot open the telemetry table: {e}") from e

    def add(self, t: Telemetry, published: bool) -> None:
        rows = [
            (t.time_ms, t.period_ms, r.sensor, r.quantity, r.unit, float(r.value), int(published))
            for r in t.readings
        ]
        with self._lock:
            try:
                with self._db:
                    self._db.executemany(
                        "INSERT INTO telemetry (time_ms, period_ms, sensor, quantity, unit, "
                        "value, published) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._db.execute(
                        "DELETE FROM telemetry WHERE id <= (SELECT MAX(id) FROM telemetry) - ?",
                        (self.max_rows,),
                    )
            except sqlite3.Error as e:
                raise BufferError_(f"cannot store telemetry: {e}") from e

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])

    def unpublished(self, limit: int) -> list[tuple[int, int, int, Reading]]:
        """(row id, time_ms, period_ms, reading) of readings not yet published, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, time_ms, period_ms, sensor, quantity, unit, value FROM telemetry "
                    "WHERE published = 0 ORDER BY id LIMIT ?",
                    (limit,),
                ).fetchall()
            except sqlite3.Error as e:
                raise BufferError_(f"cannot read unpublished telemetry: {e}") from e
        return [
            (r[0], r[1], r[2], Reading(sensor=r[3], quantity=r[4], unit=r[5], value=r[6]))
            for r in rows
        ]

    def mark_published(self, ids: list[int]) -> None:
        """Mark rows published; ids no longer there (evicted) are ignored."""
        with self._lock:
            try:
                with self._db:
                    self._db.executemany(
                        "UPDATE telemetry SET published = 1 WHERE id = ?", [(i,) for i in ids]
                    )
            except sqlite3.Error as e:
                raise BufferError_(f"cannot mark telemetry published: {e}") from e

    def unpublished_count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM telemetry WHERE published = 0").fetchone()
        return int(row[0])

    def recent(self, limit: int) -> list[tuple[int, Reading]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT time_ms, sensor, quantity, unit, value FROM telemetry "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(r[0], Reading(sensor=r[1], quantity=r[2], unit=r[3], value=r[4])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
