"""Append-only, hash-chained audit log (JSON lines).

Each entry carries ``seq`` (0, 1, 2, …), the previous entry's hash and its own hash =
SHA-256 over ``prev_hash`` and the canonical JSON of the entry without ``hash``. So
``verify`` detects any edited, deleted, inserted or reordered entry. Appends are
serialised by a lock (a thread lock and ``flock`` on the file, so a CLI command and a
running ``serve`` extend one chain) and fsynced before ``append`` returns. Every entry
records the region its data lives in.

Checkpoints (``checkpoint``): an ``audit.checkpoint`` entry holding the chain head (the
hash and seq of the entry before it) signed by the HSM's signing key (ECDSA P-256 over
``checkpoint_digest``), also appended to a separate checkpoint file meant to live
elsewhere (another host, a WORM bucket). The chain alone shows edits, deletions and
reordering; a signed checkpoint kept elsewhere also shows a log truncated, or rewritten
from scratch, by someone without the HSM: ``verify_log`` checks every checkpoint
signature against a trusted public key and every external checkpoint against the log.

Torn tail (docs/adr/0017): a crash or a full disk mid-append can leave the last line
incomplete (no newline, or zero-filled blocks), which no entry may follow. The first
append of a process (and any append that finds the file changed) recovers it under the
lock: the bytes after the last complete entry whose hash verifies are cut, kept in a
``<log>.torn-<ms>`` file, and an ``audit.recovered`` entry naming their length and
SHA-256 is chained before the entry being appended, so the service starts and the cut
is on the record. Only a tail that is not a JSON entry is cut: a complete entry whose
hash does not verify is tampering, not a torn write, and raises ``AuditError``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from cloud_sidecar.errors import AuditError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)
GENESIS = "0" * 64
MAX_LINE = 64 * 1024
CHECKPOINT_KIND = "audit.checkpoint"
RECOVERED_KIND = "audit.recovered"
CHECKPOINT_TYPE = "sovereign-edge/audit-checkpoint/v1"
MAX_CHECKPOINT_LINE = 4 * 1024


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _entry_hash(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


def checkpoint_digest(head_seq: int, head: str) -> bytes:
    """SHA-256 the HSM signs for a checkpoint: typed, so it is never valid OTA metadata."""
    return hashlib.sha256(
        _canonical({"_type": CHECKPOINT_TYPE, "head_seq": head_seq, "head": head})
    ).digest()


def default_checkpoint_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.stem + ".checkpoints.jsonl")


class AuditLog:
    def __init__(self, path: Path, region: str, checkpoint_path: Path | None = None) -> None:
        self.path = path
        self.region = region
        self.checkpoint_path = checkpoint_path or default_checkpoint_path(path)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._size = -1  # file size after our last append; another size: re-read the tail
        self._seq, self._prev = 0, GENESIS

    def _tail(self, f: Any) -> tuple[int, str, dict[str, Any] | None]:
        """Next seq and previous hash; with a torn tail, cut it first and say what was cut."""
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, GENESIS, None
        start = max(0, size - 2 * MAX_LINE)
        f.seek(start)
        data = f.read()
        end = len(data)
        while end > 0:
            line_start = data.rfind(b"\n", 0, end - 1) + 1
            if start > 0 and line_start == 0:
                raise AuditError(f"{self.path}: no complete entry in its last {len(data)} bytes")
            line = data[line_start:end].rstrip(b"\n")
            entry = _parse_entry(line)
            if entry is not None:
                break
            end = line_start  # not an entry: a torn write (or zero-filled blocks): cut it
        if end == len(data) and data.endswith(b"\n"):
            return int(entry["seq"]) + 1, str(entry["hash"]), None  # type: ignore[index]
        keep = start + end
        complete_line = data[:end].endswith(b"\n") or end == 0
        cut = data[end:]
        recovered = self._cut_tail(f, keep, cut, add_newline=not complete_line)
        if entry is None:
            return 0, GENESIS, recovered
        return int(entry["seq"]) + 1, str(entry["hash"]), recovered

    def _cut_tail(self, f: Any, keep: int, cut: bytes, add_newline: bool) -> dict[str, Any]:
        """Keep ``cut`` beside the log, truncate the log at ``keep`` (lock held)."""
        quarantine = self.path.with_name(f"{self.path.name}.torn-{int(time.time() * 1000)}")
        write_atomic(quarantine, cut, 0o600)
        f.truncate(keep)
        if add_newline:  # the last entry was complete but for its newline
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
        log.error(
            "audit log %s ended in a torn write: cut %d bytes (kept in %s)",
            self.path, len(cut), quarantine,
        )  # fmt: skip
        return {
            "cut_bytes": len(cut),
            "cut_sha256": hashlib.sha256(cut).hexdigest(),
            "kept_in": quarantine.name,
        }

    def append(self, kind: str, subject: str, **details: Any) -> str:
        return self._append(kind, subject, details)

    def checkpoint(self, sign_digest: Callable[[bytes], bytes], key_id: str) -> dict[str, Any]:
        """Sign the current chain head in the HSM; append it here and to the checkpoint file.

        Returns the checkpoint record (``head_seq``, ``head``, ``key_id``, ``sig``).
        """

        def sign(head_seq: int, head: str) -> dict[str, Any]:
            sig = sign_digest(checkpoint_digest(head_seq, head))
            return {"head_seq": head_seq, "head": head, "key_id": key_id, "sig": sig.hex()}

        record: dict[str, Any] = {}
        self._append(CHECKPOINT_KIND, key_id, record, sign)
        line = _canonical({**record, "ts": round(time.time(), 3), "region": self.region})
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.checkpoint_path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("audit checkpoint at seq %d signed by %s", record["head_seq"], key_id)
        return record

    def _append(
        self,
        kind: str,
        subject: str,
        details: dict[str, Any],
        sign: Callable[[int, str], dict[str, Any]] | None = None,
    ) -> str:
        with self._lock, open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
            if os.fstat(f.fileno()).st_size != self._size:
                self._seq, self._prev, recovered = self._tail(f)
                if recovered is not None:  # on the record before anything else
                    self._write(f, RECOVERED_KIND, "audit", recovered)
            if sign is not None:
                details.update(sign(self._seq - 1, self._prev))
            return self._write(f, kind, subject, details)

    def _write(self, f: Any, kind: str, subject: str, details: dict[str, Any]) -> str:
        """Chain and fsync one entry (lock held)."""
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
        f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        self._size = f.tell()
        self._seq += 1
        self._prev = digest
        return digest


def _parse_entry(line: bytes) -> dict[str, Any] | None:
    """The entry on ``line`` if its hash verifies; None if it is not a JSON entry at all
    (a torn write); ``AuditError`` for a JSON entry whose hash does not verify."""
    try:
        entry = json.loads(line)
        claimed = entry["hash"]
        body = {k: v for k, v in entry.items() if k != "hash"}
        prev = body["prev"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(prev, str) or _entry_hash(prev, body) != claimed:
        raise AuditError("the last audit entry was modified: not a torn write, not recovered")
    return dict(entry)


@dataclass(frozen=True)
class AuditReport:
    """What ``verify_log`` established about a log."""

    entries: int
    head: str
    checkpoints: int  # checkpoint entries in the log (their heads match the chain)
    signatures_checked: bool  # a trusted key was given and every signature verified
    last_checkpoint_seq: int | None  # seq of the last checkpoint entry
    external_checkpoints: int  # checkpoints from the separate file found in the log


def _load_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise AuditError("trusted key is not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise AuditError("trusted key is not an EC P-256 public key")
    return key


def _check_sig(key: ec.EllipticCurvePublicKey | None, cp: dict[str, Any], where: str) -> None:
    try:
        head_seq, head, sig = int(cp["head_seq"]), str(cp["head"]), bytes.fromhex(cp["sig"])
    except (KeyError, TypeError, ValueError) as e:
        raise AuditError(f"{where}: checkpoint lacks head_seq, head or sig") from e
    if key is None:
        return
    try:
        key.verify(
            sig, checkpoint_digest(head_seq, head), ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        )
    except InvalidSignature as e:
        raise AuditError(f"{where}: checkpoint signature does not verify") from e


def verify(path: Path, public_key_pem: bytes | None = None) -> int:
    """Check the whole chain (and checkpoint signatures if a key is given); entry count."""
    return verify_log(path, public_key_pem).entries


def verify_log(
    path: Path, public_key_pem: bytes | None = None, external_checkpoints: Path | None = None
) -> AuditReport:
    """Check the chain, each checkpoint entry, and each checkpoint kept elsewhere.

    Raises ``AuditError`` naming the first problem. Without ``public_key_pem`` the
    checkpoint heads are checked against the chain but their signatures are not.
    """
    key = _load_key(public_key_pem) if public_key_pem is not None else None
    prev, n = GENESIS, 0
    hashes_by_seq: dict[int, str] = {}
    checkpoint_sigs: dict[int, Any] = {}
    n_cp, last_cp = 0, None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if len(line) > MAX_LINE + 1:
                raise AuditError(f"line {lineno}: longer than {MAX_LINE} bytes")
            try:
                entry = json.loads(line)
                claimed = entry.pop("hash")
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                raise AuditError(f"line {lineno}: not an audit entry") from e
            if entry.get("seq") != n:
                raise AuditError(
                    f"line {lineno}: sequence {entry.get('seq')} where {n} was expected"
                )
            if entry.get("prev") != prev:
                raise AuditError(f"line {lineno}: does not follow the previous entry")
            if _entry_hash(prev, entry) != claimed:
                raise AuditError(f"line {lineno}: entry was modified")
            if entry.get("kind") == CHECKPOINT_KIND:
                cp = entry.get("details")
                if (
                    not isinstance(cp, dict)
                    or cp.get("head_seq") != n - 1
                    or cp.get("head") != prev
                ):
                    raise AuditError(f"line {lineno}: checkpoint does not name the entry before it")
                _check_sig(key, cp, f"line {lineno}")
                n_cp, last_cp = n_cp + 1, n
                checkpoint_sigs[n] = cp.get("sig")
            hashes_by_seq[n] = claimed
            prev, n = claimed, n + 1
    n_ext = 0
    if external_checkpoints is not None:
        n_ext = _verify_external(external_checkpoints, key, hashes_by_seq, checkpoint_sigs, n)
    return AuditReport(n, prev, n_cp, key is not None, last_cp, n_ext)


def _verify_external(
    path: Path,
    key: ec.EllipticCurvePublicKey | None,
    hashes_by_seq: dict[int, str],
    checkpoint_sigs: dict[int, Any],
    n: int,
) -> int:
    """Every checkpoint in the separate file must verify and match the log's entry."""
    count = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path.name} line {lineno}"
            if len(line) > MAX_CHECKPOINT_LINE:
                raise AuditError(f"{where}: longer than {MAX_CHECKPOINT_LINE} bytes")
            try:
                cp = json.loads(line)
                head_seq = int(cp["head_seq"])
            except (ValueError, KeyError, TypeError) as e:
                raise AuditError(f"{where}: not a checkpoint") from e
            _check_sig(key, cp, where)
            if head_seq + 1 >= n:  # the checkpoint entry itself follows its head
                raise AuditError(
                    f"{where}: checkpoint entry {head_seq + 1} is missing, the log ends at"
                    f" {n - 1}: the log was truncated"
                )
            if (head_seq >= 0 and hashes_by_seq[head_seq] != cp["head"]) or checkpoint_sigs.get(
                head_seq + 1
            ) != cp["sig"]:
                raise AuditError(f"{where}: entry {head_seq} differs from the signed checkpoint")
            count += 1
    return count
