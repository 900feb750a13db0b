"""Integrity of the OTA client's state files on the SD card: HMAC under the TPM-sealed key.

Owns the sealed JSON format of the three files the update client trusts beside the TUF
metadata, all in ``<state>/ota/``: ``floor.json`` (the rollback floor, ``ota_tuf``),
``clock.json`` (the clock's lower bound, ``ota_clock``) and ``failures.json`` (the
failure ledger, ``ota_fetch``)::

    {"body": {...}, "mac": "<hex HMAC-SHA256>"}

``mac = HMAC-SHA256(key, b"sovereign-edge/ota-state/v1\\0" + file name + b"\\0" +
canonical JSON of body)``: the file name is inside the MAC, so a valid ``failures.json``
cannot stand in for ``floor.json``. The key is ``derive_state_key(storage_key)``,
HKDF-SHA256 of the device's 32-byte storage key, which the TPM seals
(``edge_daemon/keys/tpm.py``; the replay buffer's key comes from the same unseal): whoever
holds only the SD card cannot compute it.

Policy (docs/adr/0016, "Integrity of the device's OTA state"):

- a file that exists but does not parse, has no MAC or a wrong one is *tampered*: its
  value is never used and it is never overwritten (a fresh MAC over a value computed
  from it would launder a lowered floor; the file stays for forensics). The update
  client then refuses every update with reason ``ota_state_tampered`` on
  ``fleet/v1/<device>/ota/status`` while the device keeps running its active model; the
  failure ledger treats every target as parked. Recovery is re-provisioning by an
  operator, never automatic;
- once the device is *initialised* (``<state>/ota/tuf/root.json`` exists:
  ``TufUpdateClient.bootstrap`` writes the three sealed files before that root), a
  missing file is tampered too: deleting ``floor.json`` or ``failures.json`` would lower
  the floor or revive a parked target. Before that, a missing file is a first boot;
- not detected: an older, validly sealed copy of the same file restored from an earlier
  day (replay), or the removal of the whole ``ota/`` directory with the trusted root
  (the device then re-bootstraps from the root pinned in its image, and TUF's own
  rollback protection restarts from that root). Both need a TPM NV monotonic counter
  (not built).

Invariants: ``save`` writes temp → fsync → rename (``write_atomic``) and refuses to
write over a tampered file; ``load`` never returns a value whose MAC did not verify.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_daemon.errors import OtaStateError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

TAMPERED = "ota_state_tampered"  # the status reason (fleet_protocol.messages.OtaStatus)
MAX_STATE_BYTES = 256 * 1024
_DOMAIN = b"sovereign-edge/ota-state/v1\x00"
_INFO = b"sovereign-edge ota-state v1"


def derive_state_key(storage_key: bytes) -> bytes:
    """The OTA state's MAC key: HKDF-SHA256 of the TPM-sealed storage key (32 bytes)."""
    if len(storage_key) < 32:
        raise OtaStateError("the storage key must be at least 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(storage_key)


def initialised(ota_dir: Path) -> bool:
    """The device has a trusted root: from now on every sealed file must exist."""
    return (ota_dir / "tuf" / "root.json").exists()


class _Tampered(Exception):
    """Internal: why a sealed file is not trusted (becomes ``SealedFile.tampered``)."""


class SealedFile:
    """One sealed JSON object in ``<state>/ota/``; ``tampered`` says why it is not trusted."""

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) < 32:
            raise OtaStateError("the OTA state key must be at least 32 bytes")
        self.path = path
        self._key = key
        self.tampered = ""

    def _mac(self, body: dict[str, Any]) -> str:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        msg = _DOMAIN + self.path.name.encode() + b"\x00" + canonical
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def load(self) -> dict[str, Any] | None:
        """The verified body; ``None`` when absent on a first boot or when tampered."""
        try:
            return self._verified()
        except _Tampered as e:
            if not self.tampered:
                log.error("OTA state %s refused: %s; no updates until re-provisioned", self.path, e)
            self.tampered = str(e)
            return None

    def _verified(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            if initialised(self.path.parent):
                raise _Tampered("missing after initialisation") from None
            return None
        except OSError as e:
            raise _Tampered(f"unreadable ({e})") from e
        if len(raw) > MAX_STATE_BYTES:
            raise _Tampered("too large")
        try:
            doc = json.loads(raw)
            body, mac = doc["body"], doc["mac"]
        except (ValueError, KeyError, TypeError):
            raise _Tampered("no MAC or not sealed JSON") from None
        if not isinstance(body, dict) or not isinstance(mac, str):
            raise _Tampered("no MAC or not sealed JSON")
        if not hmac.compare_digest(mac, self._mac(body)):
            raise _Tampered("MAC does not verify")
        return body

    def save(self, body: dict[str, Any]) -> None:
        if self.tampered:
            raise OtaStateError(f"{self.path} is tampered ({self.tampered}); not overwritten")
        doc = {"body": body, "mac": self._mac(body)}
        write_atomic(self.path, json.dumps(doc, sort_keys=True).encode())

    def ensure(self, body: dict[str, Any]) -> None:
        """Write ``body`` when the file does not exist yet (first boot, before the root)."""
        if not self.path.exists() and not self.tampered:
            self.save(body)
