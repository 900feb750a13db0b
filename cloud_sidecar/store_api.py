"""The sidecar store's one interface, split by concern, and the factory that opens one.

Owns: the ``Protocol`` every store implementation satisfies (``SidecarStore``: today
``cloud_sidecar.store.Store`` on SQLite, the embedded default, and
``cloud_sidecar.store_pg.PgStore`` on PostgreSQL, the path past one machine), the
narrower protocols each consumer needs (ingest needs devices and batches, the label
service labels, enrollment claims and certificates, dataset building the training
data), the feature blob codec both implementations share, and ``open_store``.

Invariants:
- every implementation passes the one contract suite
  (``tests/integration/test_store_contract.py``), run against a real SQLite file and a
  real PostgreSQL server started by devstack; behaviour that suite does not pin down
  is not part of the interface;
- a stored feature window is ``encode_features``' bytes (zlib of little-endian float16
  in ``FEATURE_SHAPE``, AES-256-GCM-sealed under a data key wrapped by the HSM, bound
  to its row: cloud_sidecar/data_keys.py, docs/adr/0022), the same in every
  implementation; no store writes or returns a window in clear without its data keys;
  the shape comes from ``fleet_protocol.features``, never from a literal here;
- every implementation upgrades its schema in numbered steps, one transaction each,
  to ``SCHEMA_VERSION`` and refuses a store newer than the code.
"""

from __future__ import annotations

import hmac
import zlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cloud_sidecar.data_keys import row_aad
from cloud_sidecar.errors import StoreError
from fleet_protocol.features import N_BANDS, N_FRAMES

if TYPE_CHECKING:
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.config import SidecarConfig
    from cloud_sidecar.data_keys import DataKeys
    from cloud_sidecar.store import Device, LabelledSample, LabelSpan
    from fleet_protocol.batch import Batch

FEATURE_SHAPE: tuple[int, ...] = (N_BANDS, N_FRAMES)
MAX_FEATURE_BLOB = 4 * 1024 * 1024  # decompressed bytes cap of one stored window


def encode_features(
    window: npt.ArrayLike, keys: DataKeys | None, device_id: str, sample_id: str
) -> bytes:
    """One window's stored bytes: zlib of ``<f2`` in ``FEATURE_SHAPE``, sealed under the
    store's current data key for the row ``(device_id, sample_id)`` (data_keys.py)."""
    arr = np.asarray(window, dtype="<f2")
    if arr.shape != FEATURE_SHAPE:
        raise StoreError(f"feature window of shape {arr.shape}, expected {FEATURE_SHAPE}")
    return require_data_keys(keys).seal(zlib.compress(arr.tobytes()), row_aad(device_id, sample_id))


def decode_features(
    blob: bytes, keys: DataKeys | None, device_id: str, sample_id: str
) -> npt.NDArray[np.float32]:
    """The float32 window stored as ``blob`` in row ``(device_id, sample_id)``;
    ``StoreError`` if it is not one or does not open under the store's data keys."""
    return _decode_plain(require_data_keys(keys).open(blob, row_aad(device_id, sample_id)))


def seal_plaintext_features(blob: bytes, keys: DataKeys, device_id: str, sample_id: str) -> bytes:
    """A row stored before schema 5 (plaintext zlib), checked and sealed (the migration)."""
    return encode_features(_decode_plain(blob), keys, device_id, sample_id)


def open_features(
    data_keys: DataKeys | None, keys: list[tuple[str, str]], blobs: list[bytes]
) -> npt.NDArray[np.float32]:
    """The windows stored as ``blobs`` in rows ``keys`` (call it outside a store's lock:
    opening may ask the HSM, or the store, for a data key)."""
    out = np.empty((len(keys), *FEATURE_SHAPE), dtype=np.float32)
    for i, ((device_id, sample_id), blob) in enumerate(zip(keys, blobs, strict=True)):
        try:
            out[i] = decode_features(blob, data_keys, device_id, sample_id)
        except StoreError as e:
            raise StoreError(f"sample {device_id}/{sample_id}: {e}") from e
    return out


def _decode_plain(plain: bytes) -> npt.NDArray[np.float32]:
    try:
        raw = zlib.decompressobj().decompress(bytes(plain), MAX_FEATURE_BLOB)
        return np.frombuffer(raw, dtype="<f2").reshape(FEATURE_SHAPE).astype(np.float32)
    except (zlib.error, ValueError) as e:
        raise StoreError(f"stored feature window is corrupt: {e}") from e


def require_data_keys(keys: DataKeys | None) -> DataKeys:
    if keys is None:
        raise StoreError("this store was opened without data keys (the HSM): features are sealed")
    return keys


def claim_refusal(
    row: tuple[str, str, int, int | None] | None, device_id: str, token_hash: str, now_ms: int
) -> str:
    """Why a claim row ``(device_id, token_hash, expires_at_ms, used_at_ms)`` cannot be used
    now, or "": the one rule every store applies (the device first: the record's MAC covers
    the device id too)."""
    if row is None:
        return "unknown_claim"
    if row[0] != device_id:
        return "claim_device_mismatch"
    if not hmac.compare_digest(row[1], token_hash):
        return "bad_token"
    if row[3] is not None:
        return "claim_used"
    return "claim_expired" if now_ms > row[2] else ""


class DeviceRegistry(Protocol):
    region: str

    def register_device(self, device_id: str, public_key_pem: bytes) -> Device: ...

    def set_device_status(self, device_id: str, status: str) -> bool: ...

    def device(self, device_id: str) -> Device | None: ...


class EnrollmentRecords(DeviceRegistry, Protocol):
    def add_claim(
        self, claim_id: str, device_id: str, token_hash: str, expires_ms: int
    ) -> None: ...

    def check_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str: ...

    def use_claim(self, claim_id: str, device_id: str, token_hash: str, now_ms: int) -> str: ...

    def add_certificate(
        self, serial: str, device_id: str, not_before_ms: int, not_after_ms: int, via: str
    ) -> None: ...

    def revoke_device(self, device_id: str, now_ms: int) -> list[str] | None: ...

    def certificates(self, device_id: str) -> list[tuple[str, int, int | None]]: ...


class BatchSink(DeviceRegistry, Protocol):
    def check_fresh(
        self, device_id: str, batch_id: str, seq: int, digest: str, epoch: int = 0
    ) -> bool: ...

    def put_batch(
        self, batch_id: str, seq: int, digest: str, batch: Batch, epoch: int = 0
    ) -> None: ...


class LabelRecords(DeviceRegistry, Protocol):
    def add_labels(self, spans: list[LabelSpan], source: str, import_id: str) -> int: ...

    def label_counts(self) -> dict[str, int]: ...


class TrainingData(Protocol):
    region: str

    def labelled_samples(self) -> list[LabelledSample]: ...

    def features(self, keys: list[tuple[str, str]]) -> npt.NDArray[np.float32]: ...

    def samples_per_device(self) -> dict[str, int]: ...

    def sample_scores(self, reason: str, since_ms: int, until_ms: int) -> list[float]: ...

    def delete_samples(self, keys: list[tuple[str, str]]) -> int: ...


@runtime_checkable
class SidecarStore(EnrollmentRecords, BatchSink, LabelRecords, TrainingData, Protocol):
    """Everything the sidecar keeps about devices, uploads and labels."""

    region: str

    @property
    def schema_version(self) -> int: ...

    def counts(self) -> dict[str, int]: ...

    def capture_times(self) -> dict[str, list[int]]: ...

    def ensure_data_key(self) -> str | None:
        """Make the first data key if there is none: its kid, or None when one existed."""
        ...

    def rotate_data_key(self, reason: str = "rotated") -> str:
        """A new current data key (its kid); rows sealed before stay readable."""
        ...

    def close(self) -> None: ...


def open_store(cfg: SidecarConfig, audit: AuditLog | None = None) -> SidecarStore:
    """The store ``cfg.store`` names (SQLite under ``data_dir`` by default), its feature
    data keys wrapped by the configured HSM (opened only when a key is first needed);
    every data key it creates is audited (``store.data_key_created``) in ``audit``, or
    in the configured audit log."""
    from cloud_sidecar.connect import open_hsm
    from cloud_sidecar.data_keys import DataKeyRow, DataKeys, HsmCustody

    def on_new(row: DataKeyRow, reason: str) -> None:
        log = audit if audit is not None else cfg.open_audit()
        log.append("store.data_key_created", row.kid, reason=reason, backend=cfg.store.backend)

    keys = DataKeys(HsmCustody(lambda: open_hsm(cfg)), on_new)
    if cfg.store.backend == "postgresql":
        from cloud_sidecar.store_pg import PgStore

        return PgStore(cfg.store.conninfo(), cfg.store.region or cfg.region, data_keys=keys)
    from cloud_sidecar.store import Store

    return Store(cfg.data_dir / "store.sqlite3", cfg.region, data_keys=keys)
