"""The sidecar's SQLite store (``store_api.SidecarStore``): device registry, replay state, batches, samples and labels.

Invariants:
- a batch, its samples and the device's replay window are written in one transaction,
  so a crash stores all of a batch or none of it;
- a batch id is stored once; a second arrival with the same envelope digest is a
  retransmission (re-acknowledged, not stored again); with another digest it is a
  replay and raises ``ReplayError``;
- replay protection does not need order (docs/adr/0017): per device and sequence epoch
  (a random number the device's buffer draws when it is created; a wiped device starts
  a new one) a batch is accepted when its ``(epoch, seq)`` was never stored and ``seq``
  lies within ``replay_window`` of the highest stored in that epoch; a stored
  ``(epoch, seq)`` under another batch id is a replay, a ``seq`` below the window is
  ``stale_seq``. Stored batch rows are the memory of what was seen (unique index on
  ``(device, epoch, seq)``); the window bounds how far back that memory must reach;
- a SQLite failure while storing a batch (disk full, I/O error, lock timeout) raises
  ``StoreError``, never ``ReplayError``: the caller treats it as transient;
- every row records the region its bytes live in;
- a claim is used at most once (checked and marked under one lock); only the
  SHA-256 of its token is stored; every issued certificate serial is kept so that
  revoking a device can list them all in the CRL;
- labels are stored all-or-nothing per import, and never contradict each other: a
  span overlapping a stored label of another class on the same device is refused; a
  sample's label is the one whose span holds its window's midpoint (capture time +
  half a window), joined when a dataset is built, so labels may arrive before or after
  the samples they describe, and unlabelled samples stay;
- schema upgrades run in order, each in one transaction (cloud_sidecar/store_schema.py);
  upgrade 5 seals every feature row stored in clear under a new data key;
- feature windows are stored only sealed (``store_api.encode_features``, a data key
  wrapped by the HSM, docs/adr/0022); a store opened without ``data_keys`` serves
  everything but features, and stores none.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud_sidecar.data_keys import DataKeyRow, DataKeys, is_sealed
from cloud_sidecar.errors import LabelError, StoreError
from cloud_sidecar.store_api import (
    claim_refusal,
    encode_features,
    open_features,
    require_data_keys,
    seal_plaintext_features,
)
from cloud_sidecar.store_schema import SCHEMA, SCHEMA_VERSION, UPGRADES
from fleet_protocol.batch import Batch
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import ReplayError
from fleet_protocol.labels import WINDOW_MS

log = logging.getLogger(__name__)

REPLAY_WINDOW = 4096  # sequence numbers per device and epoch accepted out of order


@dataclass(frozen=True)
class Device:
    device_id: str
    public_key_pem: bytes
    key_id: str
    status: str
    last_seq: int  # the strict-order high mark before schema 4; replay_windows since


@dataclass(frozen=True)
class LabelledSample:
    device_id: str
    sample_id: str
    label: str
    source: str
    # provenance for the dataset manifest (cloud_sidecar/dataset.py)
    captured_at_ms: int = 0
    batch_id: str = ""
    model_sha256: str = ""
    reason: str = ""
    predicted: str = ""  # what the device's model said (drift triggers)
    score: float = 0.0


@dataclass(frozen=True)
class LabelSpan:
    device_id: str
    start_ms: int
    end_ms: int  # exclusive
    label: str


class Store:
    """The SQLite implementation of ``store_api.SidecarStore`` (the embedded default)."""

    def __init__(
        self,
        path: Path,
        region: str,
        replay_window: int = REPLAY_WINDOW,
        *,
        data_keys: DataKeys | None = None,
    ) -> None:
        if replay_window < 1:
            raise StoreError("replay_window must be at least 1")
        self.region = region
        self.replay_window = replay_window
        self._keys = data_keys
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version == 0:
                self._db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version=1; COMMIT;")
                version = 1
            if version > SCHEMA_VERSION:
                raise StoreError(f"store schema {version} is newer than {SCHEMA_VERSION}")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                if step == 5:
                    self._upgrade_sealing()
                    continue
                self._db.executescript(
                    f"BEGIN; {UPGRADES[step]} PRAGMA user_version={step}; COMMIT;"
                )
            if data_keys is not None:
                rows = self._db.execute("SELECT kid, wrapped, created_at_ms FROM data_keys")
                data_keys.load(DataKeyRow(k, bytes(w), t) for k, w, t in rows.fetchall())
                data_keys.fetch = self._data_key_row
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store {path}: {e}") from e

    def _upgrade_sealing(self) -> None:
        """Schema 5: the data key table, and every feature row stored in clear sealed."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(UPGRADES[5])
            rows = self._db.execute("SELECT device_id, sample_id, features FROM samples")
            clear = [r for r in rows.fetchall() if not is_sealed(r[2])]
            if clear:
                if self._keys is None:
                    raise StoreError("schema 5 seals the stored features: open with data keys")
                key = self._keys.create()
                self._db.execute("INSERT INTO data_keys VALUES (?,?,?)", astuple(key))
                self._keys.adopt(key, f"schema 5 sealed {len(clear)} rows stored in clear")
                self._db.executemany(
                    "UPDATE samples SET features=? WHERE device_id=? AND sample_id=?",
                    [(seal_plaintext_features(f, self._keys, d, i), d, i) for d, i, f in clear],
                )
                log.info("schema 5: sealed %d stored feature rows under %s", len(clear), key.kid)
            self._db.execute("PRAGMA user_version=5")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _data_key_row(self, kid: str) -> DataKeyRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT kid, wrapped, created_at_ms FROM data_keys WHERE kid=?", (kid,)
            ).fetchone()
        return None if row is None else DataKeyRow(row[0], bytes(row[1]), row[2])

    def ensure_data_key(self) -> str | None:
        return require_data_keys(self._keys).ensure(self._insert_data_key)

    def rotate_data_key(self, reason: str = "rotated") -> str:
        return require_data_keys(self._keys).rotate(self._insert_data_key, reason)

    def _insert_data_key(self, key: DataKeyRow) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO data_keys VALUES (?,?,?)", astuple(key))
            except sqlite3.Error as e:
                raise StoreError(f"cannot store data key {key.kid}: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- devices -------------------------------------------------------------

    def register_device(self, device_id: str, public_key_pem: bytes) -> Device:
        with self._lock:
            self._db.execute(
                "INSERT INTO devices(device_id, public_key_pem, key_id, registered_at_ms)"
                " VALUES (?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                " public_key_pem=excluded.public_key_pem, key_id=excluded.key_id, status='active'",
                (
                    device_id,
                    public_key_pem,
                    key_id_from_pem(public_key_pem),
                    int(time.time() * 1000),
                ),
            )
        device = self.device(device_id)
        assert device is not None
        return device

    def set_device_status(self, device_id: str, status: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE devices SET status=? WHERE device_id=?", (status, device_id)
            )
            return cur.rowcount == 1

    def device(self, device_id: str) -> Device | None:
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, public_key_pem, key_id, status, last_seq FROM devices"
                " WHERE device_id=?",
                (device_id,),
            ).fetchone()
        return None if row is None else Device(row[0], bytes(row[1]), row[2], row[3], row[4])

    # -- enrollment: claims and issued certificates (cloud_sidecar/fleet.py) ---

    def add_claim(self, claim_id: str, device_id: str, token_hash: str, expires_ms: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO claims VALUES (?,?,?,?,?,NULL,?)",
                (claim_id, device_id, token_hash, int(time.time() * 1000), expires_ms, self.region),
            )

    def check_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str:
        """Why the claim cannot be used now, or "" (nothing is marked: ``use_claim`` does)."""
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, token_hash, expires_at_ms, used_at_ms FROM claims"
                " WHERE claim_id=?",
                (claim_id,),
            ).fetchone()
        return claim_refusal(row, device_id, token_hash, now_ms)

    def use_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str:
        """Mark the claim used and return "", or return why it cannot be used."""
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, token_hash, expires_at_ms, used_at_ms FROM claims"
                " WHERE claim_id=?",
                (claim_id,),
            ).fetchone()
            refusal = claim_refusal(row, device_id, token_hash, now_ms)
            if refusal:
                return refusal
            cur = self._db.execute(
                "UPDATE claims SET used_at_ms=? WHERE claim_id=? AND used_at_ms IS NULL",
                (now_ms, claim_id),
            )
            return "" if cur.rowcount == 1 else "claim_used"

    def add_certificate(
        self, serial: str, device_id: str, not_before_ms: int, not_after_ms: int, via: str
    ) -> None:
        now = int(time.time() * 1000)
        row = (serial, device_id, not_before_ms, not_after_ms, now, via, self.region)
        with self._lock:
            self._db.execute("INSERT INTO certificates VALUES (?,?,?,?,?,?,NULL,?)", row)

    def revoke_device(self, device_id: str, now_ms: int) -> list[str] | None:
        """Mark the device and all its certificates revoked (one transaction).

        Returns every serial ever issued to it (hex), so a CRL update that failed
        half-way is completed by revoking again; None for an unknown device.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "UPDATE devices SET status='revoked' WHERE device_id=?", (device_id,)
                )
                self._db.execute(
                    "UPDATE certificates SET revoked_at_ms=? WHERE device_id=?"
                    " AND revoked_at_ms IS NULL",
                    (now_ms, device_id),
                )
                rows = self._db.execute(
                    "SELECT serial FROM certificates WHERE device_id=? ORDER BY issued_at_ms",
                    (device_id,),
                ).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if cur.rowcount == 0 and not rows else [r[0] for r in rows]

    def certificates(self, device_id: str) -> list[tuple[str, int, int | None]]:
        """(serial, not_after_ms, revoked_at_ms) of every certificate issued to a device."""
        with self._lock:
            rows = self._db.execute(
                "SELECT serial, not_after_ms, revoked_at_ms FROM certificates"
                " WHERE device_id=? ORDER BY issued_at_ms",
                (device_id,),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    # -- batches -------------------------------------------------------------

    def check_fresh(
        self, device_id: str, batch_id: str, seq: int, digest: str, epoch: int = 0
    ) -> bool:
        """True if new; False if this exact batch is already stored; ReplayError otherwise.

        A cheap check before the HSM unwrap; ``put_batch`` checks again under its lock.
        """
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT digest FROM batches WHERE batch_id=?", (batch_id,)
                ).fetchone()
                if row is None:
                    self._check_window(device_id, epoch, seq)
            except sqlite3.Error as e:
                raise StoreError(f"cannot read replay state: {e}") from e
        if row is not None:
            if row[0] == digest:
                return False
            raise ReplayError(f"batch id {batch_id} already used with other content")
        return True

    def _check_window(self, device_id: str, epoch: int, seq: int) -> None:
        """ReplayError unless ``(epoch, seq)`` is unseen and within the window (lock held)."""
        top = self._db.execute(
            "SELECT max_seq FROM replay_windows WHERE device_id=? AND epoch=?", (device_id, epoch)
        ).fetchone()
        if top is not None and seq <= top[0] - self.replay_window:
            raise ReplayError(
                f"sequence {seq} (epoch {epoch}) is below the replay window"
                f" ({top[0]} - {self.replay_window})",
                "stale_seq",
            )
        taken = self._db.execute(
            "SELECT batch_id FROM batches WHERE device_id=? AND epoch=? AND seq=?",
            (device_id, epoch, seq),
        ).fetchone()
        if taken is not None:
            raise ReplayError(f"sequence {seq} (epoch {epoch}) is stored as batch {taken[0]}")

    def put_batch(self, batch_id: str, seq: int, digest: str, batch: Batch, epoch: int = 0) -> None:
        """Store a batch and its samples in one transaction (exactly once).

        ``ReplayError`` for a replay or a stale sequence (nothing stored), ``StoreError``
        when SQLite fails (disk full, I/O): nothing stored, try again later.
        """
        now = int(time.time() * 1000)
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
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"cannot store batch {batch_id}: {e}") from e
            try:
                self._check_window(batch.device, epoch, seq)
                self._db.execute(
                    "INSERT INTO batches(batch_id, device_id, seq, digest, received_at_ms,"
                    " n_samples, region, epoch) VALUES (?,?,?,?,?,?,?,?)",
                    (batch_id, batch.device, seq, digest, now, len(rows), self.region, epoch),
                )
                self._db.executemany(
                    "INSERT INTO samples(sample_id, device_id, batch_id, captured_at_ms,"
                    " predicted, score, reason, model_sha256, features, region)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                self._db.execute(
                    "INSERT INTO replay_windows VALUES (?,?,?,?) ON CONFLICT(device_id, epoch)"
                    " DO UPDATE SET max_seq=MAX(max_seq, excluded.max_seq),"
                    " updated_at_ms=excluded.updated_at_ms",
                    (batch.device, epoch, seq, now),
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self._rollback()
                raise ReplayError(f"batch {batch_id} repeats a stored batch or sample: {e}") from e
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"cannot store batch {batch_id}: {e}") from e
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as e:  # SQLite may have rolled back itself (SQLITE_FULL)
            log.debug("rollback after a failed batch: %s", e)

    # -- labels (cloud_sidecar/labels.py) -------------------------------------

    def add_labels(self, spans: list[LabelSpan], source: str, import_id: str) -> int:
        """Store ``spans`` in one transaction, or none of them.

        Raises ``LabelError`` naming every span that overlaps a stored label of another
        class on the same device (a contradiction); spans that agree with stored ones
        are kept (idempotent re-sends). Returns the number stored.
        """
        now = int(time.time() * 1000)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                problems: list[tuple[int, str, str]] = []
                for i, s in enumerate(spans):
                    clash = self._db.execute(
                        "SELECT label, start_ms, end_ms, source FROM labels WHERE device_id=?"
                        " AND start_ms < ? AND end_ms > ? AND label != ? LIMIT 1",
                        (s.device_id, s.end_ms, s.start_ms, s.label),
                    ).fetchone()
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
                self._db.executemany(
                    "INSERT INTO labels(device_id, start_ms, end_ms, label, source, import_id,"
                    " created_at_ms, region) VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (s.device_id, s.start_ms, s.end_ms, s.label, source, import_id, now,
                         self.region)
                        for s in spans
                    ],
                )  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(spans)

    def label_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT source, COUNT(*) FROM labels GROUP BY source")
            return {r[0]: r[1] for r in rows.fetchall()}

    # -- datasets ------------------------------------------------------------

    def labelled_samples(self) -> list[LabelledSample]:
        """Samples whose window midpoint lies in a label's span on the same device.

        Stored labels never contradict each other (``add_labels``), so a sample has at
        most one label; samples without one stay stored, unlabelled.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT s.device_id, s.sample_id, MIN(l.label), MIN(l.source),"
                " s.captured_at_ms, s.batch_id, s.model_sha256, s.reason, s.predicted, s.score"
                " FROM samples s JOIN labels l ON l.device_id = s.device_id"
                " AND l.start_ms <= s.captured_at_ms + ? AND l.end_ms > s.captured_at_ms + ?"
                " GROUP BY s.device_id, s.sample_id ORDER BY s.device_id, s.sample_id",
                (WINDOW_MS // 2, WINDOW_MS // 2),
            ).fetchall()
        return [LabelledSample(*r) for r in rows]

    def features(self, keys: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        with self._lock:
            blobs = []
            for device_id, sample_id in keys:
                row = self._db.execute(
                    "SELECT features FROM samples WHERE device_id=? AND sample_id=?",
                    (device_id, sample_id),
                ).fetchone()
                if row is None:
                    raise StoreError(f"no stored sample {device_id}/{sample_id}")
                blobs.append(bytes(row[0]))
        return open_features(self._keys, keys, blobs)

    def delete_samples(self, keys: list[tuple[str, str]]) -> int:
        """Delete these samples (residual speech) in one transaction; returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for device_id, sample_id in keys:
                    cur = self._db.execute(
                        "DELETE FROM samples WHERE device_id=? AND sample_id=?",
                        (device_id, sample_id),
                    )
                    n += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def sample_scores(self, reason: str, since_ms: int, until_ms: int) -> list[float]:
        """Device confidence of the samples kept for ``reason`` captured in [since, until)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT score FROM samples WHERE reason=? AND captured_at_ms >= ?"
                " AND captured_at_ms < ? ORDER BY captured_at_ms",
                (reason, since_ms, until_ms),
            ).fetchall()
        return [float(r[0]) for r in rows]

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            (d,) = self._db.execute("SELECT COUNT(*) FROM devices").fetchone()
            (b,) = self._db.execute("SELECT COUNT(*) FROM batches").fetchone()
            (s,) = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
        return {"devices": d, "batches": b, "samples": s}

    def capture_times(self) -> dict[str, list[int]]:
        """Each device's stored samples' capture times (ms), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, captured_at_ms FROM samples ORDER BY device_id, captured_at_ms"
            ).fetchall()
        out: dict[str, list[int]] = {}
        for device, t in rows:
            out.setdefault(device, []).append(t)
        return out

    def active_device_ids(self) -> list[str]:
        """Registered devices whose status is active (the rollout's population)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id FROM devices WHERE status='active' ORDER BY device_id"
            ).fetchall()
        return [r[0] for r in rows]

    def samples_per_device(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, COUNT(*) FROM samples GROUP BY device_id"
            ).fetchall()
        return {r[0]: r[1] for r in rows}
