"""Data keys for unit tests of the logic above the cloud store (ingest, labels, datasets).

The custody here is an AES-256-GCM key in this process's memory, standing in for the
HSM's ``store-kek`` where the HSM is not what a test is about; the real path (SoftHSM,
both stores, raw bytes) is ``tests/integration/test_store_contract.py``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloud_sidecar.data_keys import DataKeys
from cloud_sidecar.errors import HsmDecryptError


class MemoryCustody:
    def __init__(self) -> None:
        self._kek = AESGCM(AESGCM.generate_key(bit_length=256))

    def seal_data_key(self, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._kek.encrypt(nonce, dek, aad)

    def open_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return self._kek.decrypt(wrapped[:12], wrapped[12:], aad)
        except InvalidTag as e:
            raise HsmDecryptError("not sealed by this custody") from e


def memory_data_keys() -> DataKeys:
    return DataKeys(MemoryCustody())
