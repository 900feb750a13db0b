"""Append-only, hash-chained audit log (JSON lines).

Each entry carries ``seq`` (0, 1, 2, …), the previous entry's hash and its own hash =
SHA-256 over ``prev_hash`` and the canonical JSON of the entry without ``hash``. So
``verify`` detects any edited, deleted, inserted or reordered entry. Appends are
serialised by a lock and fsynced before ``append`` returns. Every entry records the
region its data lives in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cloud_sidecar.errors import AuditError

log = logging.getLogger(__name__)
GENESIS = "0" * 64
MAX_LINE = 64 * 1024


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _entry_hash(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


class AuditLog:
    def __init__(self, path: Path, region: str) -> None:
        self.path = path
        self.region = region
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = self._tail()

    def _tail(self) -> tuple[int, str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        with open(self.path, "rb") as f:
            f.seek(max(0, self.path.stat().st_size - 2 * MAX_LINE))
            last = f.read().splitlines()[-1]
        entry = json.loads(last)
        return int(entry["seq"]) + 1, str(entry["hash"])

    def append(self, kind: str, subject: str, **details: Any) -> str:
        with self._lock:
            body = {
                "seq": self._seq,
                "ts": round(time.time(), 3),
                "kind": kind,
                "subject": subject,
                "region": self.region,
                "details": details,
                "prev": self._prev,
            }
            digest = _entry_hash(self._prev, body)
            line = _canonical({**body, "hash": digest}) + b"\n"
            if len(line) > MAX_LINE:
                raise AuditError(f"audit entry of {len(line)} bytes exceeds {MAX_LINE}")
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._seq += 1
            self._prev = digest
            return digest


def verify(path: Path) -> int:
    """Check the whole chain; return the number of entries or raise ``AuditError``."""
    prev, n = GENESIS, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                claimed = entry.pop("hash")
            except (ValueError, KeyError, AttributeError) as e:
                raise AuditError(f"line {lineno}: not an audit entry") from e
            if entry.get("seq") != n:
                raise AuditError(
                    f"line {lineno}: sequence {entry.get('seq')} where {n} was expected"
                )
            if entry.get("prev") != prev:
                raise AuditError(f"line {lineno}: does not follow the previous entry")
            if _entry_hash(prev, entry) != claimed:
                raise AuditError(f"line {lineno}: entry was modified")
            prev, n = claimed, n + 1
    return n
