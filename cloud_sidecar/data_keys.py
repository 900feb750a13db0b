"""Features at rest in the cloud store: data keys (DEKs) wrapped by the HSM, one AEAD per row.

Owns: ``DataKeys``, the data keys of one store. A DEK is 32 random bytes made here,
sealed by the token's ``store-kek`` (``Hsm.seal_data_key``: ``CKM_AES_GCM`` inside the
HSM, docs/adr/0022) and kept only sealed in the store's ``data_keys`` table
``(kid, wrapped, created_at_ms)``; the clear DEK lives only in this process's memory,
unsealed on first use. ``seal``/``open`` turn one stored row's bytes into
``SEALED_MAGIC || kid(8) || nonce(12) || AES-256-GCM ciphertext+tag`` and back; the
associated data names the row (``row_aad``: device id and sample id), so a blob moved
to another row does not open. ``HsmCustody`` is the production ``KeyCustody``.

Invariants:
- nothing in the store is enough to read a row: the DEK is sealed by a key that never
  leaves the HSM, and the sealed DEK's associated data names its kid;
- a new DEK becomes current only after its row is stored (``adopt``), so no row is ever
  sealed under a key the store does not hold; rows under older DEKs keep opening
  (rotation: new rows under the new key, old ones readable);
- every failure to seal or open is ``StoreError`` (no key, wrong key, tampered row,
  HSM refusal), never plaintext and never a silent empty result.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloud_sidecar.errors import HsmError, StoreError

SEALED_MAGIC = b"\x00SEF1"  # never the start of a zlib stream (0x78 ...): plaintext is told apart
_KID_LEN = 8
_NONCE_LEN = 12
_DEK_TAG = b"sovereign-edge store data key v1\x00"
_ROW_TAG = b"sovereign-edge stored features v1\x00"


class KeyCustody(Protocol):
    """Who seals and opens data keys (the HSM's ``store-kek``)."""

    def seal_data_key(self, dek: bytes, aad: bytes) -> bytes: ...

    def open_data_key(self, wrapped: bytes, aad: bytes) -> bytes: ...


class HsmCustody:
    """``KeyCustody`` through ``open_hsm`` (a fresh ``Hsm`` per call; sessions on one token
    are shared in-process, so this is cheap, and a token that came back is picked up)."""

    def __init__(self, open_hsm: Callable[[], AbstractContextManager[KeyCustody]]) -> None:
        self._open_hsm = open_hsm

    def seal_data_key(self, dek: bytes, aad: bytes) -> bytes:
        with self._open_hsm() as hsm:
            return hsm.seal_data_key(dek, aad)

    def open_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        with self._open_hsm() as hsm:
            return hsm.open_data_key(wrapped, aad)


@dataclass(frozen=True)
class DataKeyRow:
    kid: str
    wrapped: bytes
    created_at_ms: int


def row_aad(device_id: str, sample_id: str) -> bytes:
    """The associated data that binds a sealed feature blob to its row."""
    return _ROW_TAG + device_id.encode() + b"\x00" + sample_id.encode()


def is_sealed(blob: bytes) -> bool:
    return bytes(blob[: len(SEALED_MAGIC)]) == SEALED_MAGIC


class DataKeys:
    """The DEKs of one store: the current one seals, every known one opens.

    ``fetch`` looks one ``DataKeyRow`` up by kid in the store (a key another process
    created after this one loaded its rows); the store calls ``load`` once it is open,
    stores the row ``create`` returns and then ``adopt``s it, saying why (``on_new``).
    """

    def __init__(
        self, custody: KeyCustody, on_new: Callable[[DataKeyRow, str], None] | None = None
    ) -> None:
        self._custody = custody
        self._on_new = on_new
        self._lock = threading.Lock()
        self._rows: dict[str, DataKeyRow] = {}
        self._clear: dict[str, AESGCM] = {}
        self._current: str | None = None
        self.fetch: Callable[[str], DataKeyRow | None] = lambda _kid: None

    @property
    def current_kid(self) -> str | None:
        return self._current

    def load(self, rows: Iterable[DataKeyRow]) -> None:
        """Know the store's DEK rows; the newest becomes current (nothing is unsealed yet)."""
        with self._lock:
            for row in rows:
                self._rows[row.kid] = row
            if self._rows:
                newest = max(self._rows.values(), key=lambda r: (r.created_at_ms, r.kid))
                self._current = newest.kid

    def create(self) -> DataKeyRow:
        """A new DEK, sealed by the HSM; current only once ``adopt`` is called."""
        dek = AESGCM.generate_key(bit_length=256)
        kid = os.urandom(_KID_LEN).hex()
        try:
            wrapped = self._custody.seal_data_key(dek, _DEK_TAG + kid.encode())
        except HsmError as e:
            raise StoreError(f"cannot seal a new data key in the HSM: {e}") from e
        row = DataKeyRow(kid, wrapped, int(time.time() * 1000))
        with self._lock:
            self._clear[kid] = AESGCM(dek)
        return row

    def adopt(self, row: DataKeyRow, reason: str) -> None:
        """``row`` is stored: new rows are sealed under it from now on; ``on_new`` is told
        (the sidecar audits ``store.data_key_created`` with ``reason``)."""
        with self._lock:
            self._rows[row.kid] = row
            self._current = row.kid
        if self._on_new is not None:
            self._on_new(row, reason)

    def rotate(self, persist: Callable[[DataKeyRow], None], reason: str) -> str:
        """Create a DEK, ``persist`` its row (the store's INSERT), then adopt it; a row
        that could not be stored is never used. Returns its kid."""
        key = self.create()
        persist(key)
        self.adopt(key, reason)
        return key.kid

    def ensure(self, persist: Callable[[DataKeyRow], None]) -> str | None:
        """A first DEK when the store has none: its kid, or None when one is current."""
        return None if self._current is not None else self.rotate(persist, "first")

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        kid = self._current
        if kid is None:
            raise StoreError("the store has no data key yet")
        nonce = os.urandom(_NONCE_LEN)
        return SEALED_MAGIC + bytes.fromhex(kid) + nonce + self._key(kid).encrypt(nonce, plain, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        blob = bytes(blob)
        head = len(SEALED_MAGIC)
        if not is_sealed(blob) or len(blob) < head + _KID_LEN + _NONCE_LEN + 16:
            raise StoreError("stored features are not sealed under a data key")
        kid = blob[head : head + _KID_LEN].hex()
        nonce = blob[head + _KID_LEN : head + _KID_LEN + _NONCE_LEN]
        try:
            return self._key(kid).decrypt(nonce, blob[head + _KID_LEN + _NONCE_LEN :], aad)
        except InvalidTag as e:
            raise StoreError(f"stored features do not open under data key {kid}") from e

    def _key(self, kid: str) -> AESGCM:
        with self._lock:
            key = self._clear.get(kid)
            row = self._rows.get(kid)
        if key is not None:
            return key
        row = row or self.fetch(kid)
        if row is None:
            raise StoreError(f"data key {kid} is not in the store")
        try:
            dek = self._custody.open_data_key(row.wrapped, _DEK_TAG + kid.encode())
        except HsmError as e:
            raise StoreError(f"the HSM does not open data key {kid}: {e}") from e
        if len(dek) != 32:
            raise StoreError(f"data key {kid} is not 256 bits")
        key = AESGCM(dek)
        with self._lock:
            self._rows[kid] = row
            self._clear[kid] = key
        return key


__all__ = [
    "SEALED_MAGIC",
    "DataKeyRow",
    "DataKeys",
    "HsmCustody",
    "KeyCustody",
    "is_sealed",
    "row_aad",
]
