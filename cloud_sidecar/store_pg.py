"""The sidecar's PostgreSQL store (``store_api.SidecarStore``): the path past one machine.

Same contract as the SQLite ``cloud_sidecar.store.Store`` (one suite tests both:
``tests/integration/test_store_contract.py``); what differs is how it holds it when
several sidecar processes share one database:

- a batch, its samples and the device's replay window (docs/adr/0017: per device and
  sequence epoch, any unseen ``seq`` within ``replay_window`` of the highest stored)
  are written in one transaction that first locks the device's row (``SELECT ... FOR
  UPDATE``), so two ingest workers cannot both store the same ``(epoch, seq)``;
- a claim is checked and marked used under the claim row's lock;
- a label import holds a transaction-scoped advisory lock per device it touches
  (taken in sorted order), so two imports cannot both store contradicting spans;
- schema: ``MIGRATIONS[n]`` takes the database from version n-1 to n in one
  transaction under an advisory lock, recorded in ``schema_migrations``; a database
  newer than ``SCHEMA_VERSION`` is refused. Version numbers match the SQLite store's.

Driver: psycopg 3 (``psycopg``), imported when a store is opened, so the rest of the
sidecar runs without it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cloud_sidecar.data_keys import DataKeyRow, DataKeys, is_sealed
from cloud_sidecar.errors import LabelError, StoreError
from cloud_sidecar.store import (
    REPLAY_WINDOW,
    Device,
    LabelledSample,
    LabelSpan,
)
from cloud_sidecar.store_api import (
    claim_refusal,
    encode_features,
    open_features,
    require_data_keys,
    seal_plaintext_features,
)
from cloud_sidecar.store_schema import SCHEMA_VERSION
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import ReplayError
from fleet_protocol.labels import WINDOW_MS

if TYPE_CHECKING:
    from fleet_protocol.batch import Batch

_MIGRATION_LOCK = 0x5E_0001  # advisory lock id held while migrating
_LABEL_LOCK_NS = 0x5E_0002  # advisory lock namespace for label imports (per device)

MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    public_key_pem BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    registered_at_ms BIGINT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT -1
);
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    seq BIGINT NOT NULL,
    digest TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    n_samples INTEGER NOT NULL,
    region TEXT NOT NULL
);
CREATE TABLE samples (
    sample_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    batch_id TEXT NOT NULL REFERENCES batches(batch_id),
    captured_at_ms BIGINT NOT NULL,
    predicted TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    features BYTEA NOT NULL,
    region TEXT NOT NULL,
    PRIMARY KEY (device_id, sample_id)
);
""",
    2: """
CREATE TABLE claims (
    claim_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms BIGINT,
    region TEXT NOT NULL
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    via TEXT NOT NULL,
    revoked_at_ms BIGINT,
    region TEXT NOT NULL
);
CREATE INDEX certificates_device ON certificates(device_id);
""",
    3: """
CREATE TABLE labels (
    label_id BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    import_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    region TEXT NOT NULL
);
CREATE INDEX labels_device_time ON labels(device_id, start_ms);
CREATE INDEX samples_device_time ON samples(device_id, captured_at_ms);
""",
    # 4: replay window per device and sequence epoch (docs/adr/0017), as in SQLite
    4: """
ALTER TABLE batches ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX batches_device_epoch_seq ON batches(device_id, epoch, seq);
CREATE TABLE replay_windows (
    device_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    max_seq BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, epoch)
);
INSERT INTO replay_windows SELECT device_id, 0, last_seq, registered_at_ms FROM devices
    WHERE last_seq >= 0;
""",
    # 5: feature rows sealed under data keys wrapped by the HSM (docs/adr/0022); the rows
    # stored in clear before are sealed by ``PgStore._seal_clear_rows`` in this transaction
    5: """
CREATE TABLE data_keys (
    kid TEXT PRIMARY KEY,
    wrapped BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL
);
""",
}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1)), "one migration per version"


def _now_ms() -> int:
    return int(time.time() * 1000)


class PgStore:
    """``SidecarStore`` on one PostgreSQL database (``conninfo``: a libpq string)."""

    def __init__(
        self,
        conninfo: str,
        region: str,
        replay_window: int = REPLAY_WINDOW,
        *,
        connect_timeout_s: int = 10,
        data_keys: DataKeys | None = None,
    ) -> None:
        if replay_window < 1:
            raise StoreError("replay_window must be at least 1")
        self.replay_window = replay_window
        try:
            import psycopg  # type: ignore[import-not-found, unused-ignore]
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise StoreError(
                "store backend postgresql needs the psycopg package (psycopg 3)"
            ) from e
        self._psycopg: Any = psycopg
        self._keys = data_keys
        self.region = region
        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(conninfo, autocommit=True, connect_timeout=connect_timeout_s)
            self._migrate()
            if data_keys is not None:
                with self._tx() as cur:
                    cur.execute("SELECT kid, wrapped, created_at_ms FROM data_keys")
                    rows = cur.fetchall()
                data_keys.load(DataKeyRow(k, bytes(w), t) for k, w, t in rows)
                data_keys.fetch = self._data_key_row
        except psycopg.Error as e:
            raise StoreError(f"cannot open the postgresql store: {e}") from e

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor inside one transaction (committed on success, rolled back on error)."""
        with self._lock:
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    yield cur
            except self._psycopg.errors.UniqueViolation:
                raise
            except self._psycopg.Error as e:
                raise StoreError(f"postgresql store: {e}") from e

    def _migrate(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            (version,) = cur.fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(f"store schema {version} is newer than {SCHEMA_VERSION}")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cur.execute("SELECT 1 FROM schema_migrations WHERE version=%s", (step,))
                if cur.fetchone() is not None:  # another process applied it meanwhile
                    continue
                cur.execute(MIGRATIONS[step])
                if step == 5:
                    self._seal_clear_rows(cur)
                cur.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (step, _now_ms()))

    def _seal_clear_rows(self, cur: Any) -> None:
        """Migration 5: every feature row stored in clear, sealed under a new data key."""
        cur.execute("SELECT device_id, sample_id, features FROM samples")
        clear = [r for r in cur.fetchall() if not is_sealed(bytes(r[2]))]
        if not clear:
            return
        if self._keys is None:
            raise StoreError("schema 5 seals the stored features: open with data keys")
        key = self._keys.create()
        cur.execute("INSERT INTO data_keys VALUES (%s,%s,%s)", astuple(key))
        self._keys.adopt(key, f"schema 5 sealed {len(clear)} rows stored in clear")
        cur.executemany(
            "UPDATE samples SET features=%s WHERE device_id=%s AND sample_id=%s",
            [(seal_plaintext_features(bytes(f), self._keys, d, i), d, i) for d, i, f in clear],
        )

    def _data_key_row(self, kid: str) -> DataKeyRow | None:
        with self._tx() as cur:
            cur.execute("SELECT kid, wrapped, created_at_ms FROM data_keys WHERE kid=%s", (kid,))
            row = cur.fetchone()
        return None if row is None else DataKeyRow(row[0], bytes(row[1]), row[2])

    def ensure_data_key(self) -> str | None:
        return require_data_keys(self._keys).ensure(self._insert_data_key)

    def rotate_data_key(self, reason: str = "rotated") -> str:
        return require_data_keys(self._keys).rotate(self._insert_data_key, reason)

    def _insert_data_key(self, key: DataKeyRow) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO data_keys VALUES (%s,%s,%s)", astuple(key))

    @property
    def schema_version(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            return int(cur.fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- devices ----------------------------------------------------------------

    def register_device(self, device_id: str, public_key_pem: bytes) -> Device:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO devices(device_id, public_key_pem, key_id, registered_at_ms)"
                " VALUES (%s,%s,%s,%s) ON CONFLICT(device_id) DO UPDATE SET"
                " public_key_pem=excluded.public_key_pem, key_id=excluded.key_id,"
                " status='active'",
                (device_id, public_key_pem, key_id_from_pem(public_key_pem), _now_ms()),
            )
        device = self.device(device_id)
        assert device is not None
        return device

    def set_device_status(self, device_id: str, status: str) -> bool:
        with self._tx() as cur:
            cur.execute("UPDATE devices SET status=%s WHERE device_id=%s", (status, device_id))
            return bool(cur.rowcount == 1)

    def device(self, device_id: str) -> Device | None:
        with self._tx() as cur:
            cur.execute(
                "SELECT device_id, public_key_pem, key_id, status, last_seq FROM devices"
                " WHERE device_id=%s",
                (device_id,),
            )
            row = cur.fetchone()
        return None if row is None else Device(row[0], bytes(row[1]), row[2], row[3], row[4])

    # -- enrollment ---------------------------------------------------------------

    def add_claim(self, claim_id: str, device_id: str, token_hash: str, expires_ms: int) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO claims VALUES (%s,%s,%s,%s,%s,NULL,%s)",
                (claim_id, device_id, token_hash, _now_ms(), expires_ms, self.region),
            )

    def check_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str:
        """Why the claim cannot be used now, or "" (nothing is marked: ``use_claim`` does)."""
        with self._tx() as cur:
            cur.execute(
                "SELECT device_id, token_hash, expires_at_ms, used_at_ms FROM claims"
                " WHERE claim_id=%s",
                (claim_id,),
            )
            row = cur.fetchone()
        return claim_refusal(row, device_id, token_hash, now_ms)

    def use_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str:
        """Mark the claim used and return "", or return why it cannot be used."""
        with self._tx() as cur:
            cur.execute(
                "SELECT device_id, token_hash, expires_at_ms, used_at_ms FROM claims"
                " WHERE claim_id=%s FOR UPDATE",
                (claim_id,),
            )
            row = cur.fetchone()
            refusal = claim_refusal(row, device_id, token_hash, now_ms)
            if refusal:
                return refusal
            cur.execute(
                "UPDATE claims SET used_at_ms=%s WHERE claim_id=%s AND used_at_ms IS NULL",
                (now_ms, claim_id),
            )
            return "" if cur.rowcount == 1 else "claim_used"

    def add_certificate(
        self, serial: str, device_id: str, not_before_ms: int, not_after_ms: int, via: str
    ) -> None:
        row = (serial, device_id, not_before_ms, not_after_ms, _now_ms(), via, self.region)
        with self._tx() as cur:
            cur.execute("INSERT INTO certificates VALUES (%s,%s,%s,%s,%s,%s,NULL,%s)", row)

    def revoke_device(self, device_id: str, now_ms: int) -> list[str] | None:
        with self._tx() as cur:
            cur.execute("UPDATE devices SET status='revoked' WHERE device_id=%s", (device_id,))
            found = cur.rowcount
            cur.execute(
                "UPDATE certificates SET revoked_at_ms=%s WHERE device_id=%s"
                " AND revoked_at_ms IS NULL",
                (now_ms, device_id),
            )
            cur.execute(
                "SELECT serial FROM certificates WHERE device_id=%s ORDER BY issued_at_ms",
                (device_id,),
            )
            rows = cur.fetchall()
        return None if found == 0 and not rows else [r[0] for r in rows]

    def certificates(self, device_id: str) -> list[tuple[str, int, int | None]]:
        with self._tx() as cur:
            cur.execute(
                "SELECT serial, not_after_ms, revoked_at_ms FROM certificates"
                " WHERE device_id=%s ORDER BY issued_at_ms",
                (device_id,),
            )
            return [(r[0], r[1], r[2]) for r in cur.fetchall()]

    # -- batches --------------------------------------------------------------------

    def check_fresh(
        self, device_id: str, batch_id: str, seq: int, digest: str, epoch: int = 0
    ) -> bool:
        """True if new; False if this exact batch is already stored; ReplayError otherwise."""
        with self._tx() as cur:
            cur.execute("SELECT digest FROM batches WHERE batch_id=%s", (batch_id,))
            row = cur.fetchone()
            if row is None:
                self._check_window(cur, device_id, epoch, seq)
        if row is not None:
            if row[0] == digest:
                return False
            raise ReplayError(f"batch id {batch_id} already used with other content")
        return True

    def _check_window(self, cur: Any, device_id: str, epoch: int, seq: int) -> None:
        """ReplayError unless ``(epoch, seq)`` is unseen and within the window."""
        cur.execute(
            "SELECT max_seq FROM replay_windows WHERE device_id=%s AND epoch=%s",
            (device_id, epoch),
        )
        top = cur.fetchone()
        if top is not None and seq <= top[0] - self.replay_window:
            raise ReplayError(
                f"sequence {seq} (epoch {epoch}) is below the replay window"
                f" ({top[0]} - {self.replay_window})",
                "stale_seq",
            )
        cur.execute(
            "SELECT batch_id FROM batches WHERE device_id=%s AND epoch=%s AND seq=%s",
            (device_id, epoch, seq),
        )
        taken = cur.fetchone()
        if taken is not None:
            raise ReplayError(f"sequence {seq} (epoch {epoch}) is stored as batch {taken[0]}")

    def put_batch(self, batch_id: str, seq: int, digest: str, batch: Batch, epoch: int = 0) -> None:
        if batch.samples:
            self.ensure_data_key()
        rows = [
            (
                s.sample_id,
                batch.device,
                batch_id,
                s.captured_at_ms,
                s.predicted,
                s.score,
                s.reason,
                s.model_sha256,
                encode_features(batch.features[i], self._keys, batch.device, s.sample_id),
                self.region,
            )
            for i, s in enumerate(batch.samples)
        ]
        now = _now_ms()
        try:
            with self._tx() as cur:
                # one writer per device at a time: the window check and the insert agree
                cur.execute("SELECT 1 FROM devices WHERE device_id=%s FOR UPDATE", (batch.device,))
                self._check_window(cur, batch.device, epoch, seq)
                cur.execute(
                    "INSERT INTO batches(batch_id, device_id, seq, digest, received_at_ms,"
                    " n_samples, region, epoch) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                    (batch_id, batch.device, seq, digest, now, len(rows), self.region, epoch),
                )
                cur.executemany(
                    "INSERT INTO samples(sample_id, device_id, batch_id, captured_at_ms,"
                    " predicted, score, reason, model_sha256, features, region)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    rows,
                )
                cur.execute(
                    "INSERT INTO replay_windows VALUES (%s,%s,%s,%s)"
                    " ON CONFLICT(device_id, epoch) DO UPDATE SET"
                    " max_seq=GREATEST(replay_windows.max_seq, excluded.max_seq),"
                    " updated_at_ms=excluded.updated_at_ms",
                    (batch.device, epoch, seq, now),
                )
        except self._psycopg.errors.UniqueViolation as e:
            raise ReplayError(f"batch {batch_id} repeats a stored batch or sample: {e}") from e

    # -- labels -----------------------------------------------------------------------

    def add_labels(self, spans: list[LabelSpan], source: str, import_id: str) -> int:
        now = _now_ms()
        with self._tx() as cur:
            for device in sorted({s.device_id for s in spans}):
                cur.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LABEL_LOCK_NS, device)
                )
            problems: list[tuple[int, str, str]] = []
            for i, s in enumerate(spans):
                cur.execute(
                    "SELECT label, start_ms, end_ms, source FROM labels WHERE device_id=%s"
                    " AND start_ms < %s AND end_ms > %s AND label != %s LIMIT 1",
                    (s.device_id, s.end_ms, s.start_ms, s.label),
                )
                clash = cur.fetchone()
                if clash is not None:
                    problems.append(
                        (
                            i,
                            "contradicts_stored_label",
                            f"{s.label} on {s.device_id} [{s.start_ms}, {s.end_ms}) overlaps"
                            f" {clash[0]} [{clash[1]}, {clash[2]}) from {clash[3]}",
                        )
                    )
            if problems:
                raise LabelError(f"{len(problems)} label(s) contradict stored ones", problems)
            cur.executemany(
                "INSERT INTO labels(device_id, start_ms, end_ms, label, source, import_id,"
                " created_at_ms, region) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                [
                    (s.device_id, s.start_ms, s.end_ms, s.label, source, import_id, now,
                     self.region)
                    for s in spans
                ],
            )  # fmt: skip
        return len(spans)

    def label_counts(self) -> dict[str, int]:
        with self._tx() as cur:
            cur.execute("SELECT source, COUNT(*) FROM labels GROUP BY source")
            return {r[0]: int(r[1]) for r in cur.fetchall()}

    # -- datasets -----------------------------------------------------------------------

    def labelled_samples(self) -> list[LabelledSample]:
        with self._tx() as cur:
            cur.execute(
                "SELECT s.device_id, s.sample_id, MIN(l.label), MIN(l.source),"
                " s.captured_at_ms, s.batch_id, s.model_sha256, s.reason, s.predicted, s.score"
                " FROM samples s JOIN labels l ON l.device_id = s.device_id"
                " AND l.start_ms <= s.captured_at_ms + %s AND l.end_ms > s.captured_at_ms + %s"
                " GROUP BY s.device_id, s.sample_id"
                ' ORDER BY s.device_id COLLATE "C", s.sample_id COLLATE "C"',
                (WINDOW_MS // 2, WINDOW_MS // 2),
            )
            rows = cur.fetchall()
        return [LabelledSample(*r) for r in rows]

    def features(self, keys: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        blobs = []
        with self._tx() as cur:
            for device_id, sample_id in keys:
                cur.execute(
                    "SELECT features FROM samples WHERE device_id=%s AND sample_id=%s",
                    (device_id, sample_id),
                )
                row = cur.fetchone()
                if row is None:
                    raise StoreError(f"no stored sample {device_id}/{sample_id}")
                blobs.append(bytes(row[0]))
        return open_features(self._keys, keys, blobs)

    def delete_samples(self, keys: list[tuple[str, str]]) -> int:
        n = 0
        with self._tx() as cur:
            for device_id, sample_id in keys:
                cur.execute(
                    "DELETE FROM samples WHERE device_id=%s AND sample_id=%s",
                    (device_id, sample_id),
                )
                n += cur.rowcount
        return n

    def sample_scores(self, reason: str, since_ms: int, until_ms: int) -> list[float]:
        with self._tx() as cur:
            cur.execute(
                "SELECT score FROM samples WHERE reason=%s AND captured_at_ms >= %s"
                " AND captured_at_ms < %s ORDER BY captured_at_ms",
                (reason, since_ms, until_ms),
            )
            return [float(r[0]) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        with self._tx() as cur:
            cur.execute(
                "SELECT (SELECT COUNT(*) FROM devices), (SELECT COUNT(*) FROM batches),"
                " (SELECT COUNT(*) FROM samples)"
            )
            d, b, s = cur.fetchone()
        return {"devices": int(d), "batches": int(b), "samples": int(s)}

    def capture_times(self) -> dict[str, list[int]]:
        with self._tx() as cur:
            cur.execute(
                "SELECT device_id, captured_at_ms FROM samples"
                ' ORDER BY device_id COLLATE "C", captured_at_ms'
            )
            rows = cur.fetchall()
        out: dict[str, list[int]] = {}
        for device, t in rows:
            out.setdefault(device, []).append(int(t))
        return out

    def samples_per_device(self) -> dict[str, int]:
        with self._tx() as cur:
            cur.execute("SELECT device_id, COUNT(*) FROM samples GROUP BY device_id")
            return {r[0]: int(r[1]) for r in cur.fetchall()}
