"""python-tuf's network seam over MQTT: a ``FetcherInterface`` that fetches in bounded chunks.

Owns ``<state>/ota/partial/`` (downloads in progress, for resume) and
``<state>/ota/failures.json`` (the ledger of failing targets). The request/response
itself is a callable (``Request``): over the broker it is
``edge_daemon.ota_link.MqttRequester``; tests pair it with the sidecar's answer function
in memory.

Behaviour:
- **bounded before the first byte**: python-tuf passes the signed length (or the role's
  byte cap) to ``download_file``; the first request asks for at most that, a response
  whose ``total`` exceeds it ends the download (``DownloadLengthMismatchError``), and
  no request ever asks past it;
- **resumable**: a target file (immutable: its name starts with its hash) is appended
  to ``partial/<name>`` chunk by chunk, each fsync'd; after a disconnect or a reboot the
  next attempt yields the kept prefix and asks from its end. The partial is removed
  once complete (python-tuf then checks length and hash of the whole);
- **rate-limited**: requests are paced to ``rate_bytes_per_s``;
- **retries with backoff**: a chunk that gets no (valid) answer is asked again after
  ``backoff_s``, at most ``retries_per_chunk`` times; then the download fails;
- **parking**: ``FailureLedger`` counts failed attempts per target; after
  ``park_after_failures`` the target is parked (reported, never re-fetched) until the
  signed metadata names a different file. The ledger is sealed (``ota_state``): when
  its file is tampered (or missing once initialised) every target counts as parked and
  nothing is written over it, so editing the card cannot revive a parked target.

Invariants: no more than the bound is ever requested or kept; a response is accepted
only at the requested offset with at most the requested length.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from edge_daemon.errors import OtaTransferError
from edge_daemon.ota_state import SealedFile
from edge_daemon.ota_tuf import METADATA_URL, TARGETS_URL
from fleet_protocol.errors import ProtocolError
from fleet_protocol.ota_transfer import (
    DEFAULT_LIMITS,
    STATUS_NOT_FOUND,
    STATUS_OK,
    ChunkRequest,
    ChunkResponse,
    TransferLimits,
    backoff_s,
    parse_path,
)

log = logging.getLogger(__name__)

Request = Callable[[ChunkRequest], bytes]  # raises OtaTransferError when no answer comes


@dataclass
class TransferStats:
    requests: int = 0
    payload_bytes: int = 0
    response_bytes: int = 0
    retries: int = 0
    resumed_bytes: int = 0


class ChunkFetcher(FetcherInterface):
    def __init__(
        self,
        request: Request,
        state_dir: Path,
        limits: TransferLimits = DEFAULT_LIMITS,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._request = request
        self.partial_dir = state_dir / "ota" / "partial"
        self._limits = limits
        self._sleep = sleep
        self._monotonic = monotonic
        self._bound: int | None = None
        self._next_at = 0.0
        self.stats = TransferStats()

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        self._bound = max_length  # the signed length / role cap, known before any request
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._bound = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        for prefix, sub in ((METADATA_URL, "metadata/"), (TARGETS_URL, "targets/")):
            if url.startswith(prefix):
                path = sub + url[len(prefix) :]
                break
        else:
            raise tuf_errors.DownloadHTTPError(f"not an OTA url: {url[:80]}", STATUS_NOT_FOUND)
        try:
            parse_path(path)
        except ProtocolError as e:
            raise tuf_errors.DownloadHTTPError(str(e), STATUS_NOT_FOUND) from e
        bound = min(self._bound or self._limits.max_file, self._limits.max_file)
        return self._chunks(path, bound)

    def _chunks(self, path: str, bound: int) -> Iterator[bytes]:
        resumable = path.startswith("targets/")
        partial = self.partial_dir / path.split("/", 1)[1]
        offset = 0
        if resumable and partial.exists():
            kept = partial.read_bytes()[:bound]
            offset = len(kept)
            self.stats.resumed_bytes += offset
            if kept:
                log.info("resuming %s at byte %d", path[:80], offset)
                yield kept
            if offset >= bound:  # complete before a crash; python-tuf checks its hash
                partial.unlink(missing_ok=True)
                return
        total: int | None = None
        while total is None or offset < total:
            want = min(self._limits.max_chunk, bound - offset)
            if want <= 0:  # the server has more than the bound allows: stop asking
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{path[:80]} is longer than its bound of {bound} bytes"
                )
            resp = self._ask(ChunkRequest(path=path, offset=offset, length=want))
            if resp.status == STATUS_NOT_FOUND:
                raise tuf_errors.DownloadHTTPError(f"{path[:80]} not found", STATUS_NOT_FOUND)
            if resp.total > bound:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{path[:80]} has {resp.total} bytes, more than its bound of {bound}"
                )
            if total is not None and resp.total != total:
                raise tuf_errors.DownloadError(f"{path[:80]} changed size during the transfer")
            total = resp.total
            if offset == total:
                break
            if resumable:
                self.partial_dir.mkdir(parents=True, exist_ok=True)
                with open(partial, "ab") as f:
                    f.write(resp.data)
                    f.flush()
                    os.fsync(f.fileno())
            offset += len(resp.data)
            yield resp.data
        if resumable:
            partial.unlink(missing_ok=True)

    def _ask(self, req: ChunkRequest) -> ChunkResponse:
        for attempt in range(self._limits.retries_per_chunk + 1):
            if attempt:
                self.stats.retries += 1
                self._sleep(backoff_s(attempt, self._limits, random.random()))
            self._pace(req.length)
            try:
                payload = self._request(req)
                self.stats.requests += 1
                self.stats.response_bytes += len(payload)
                resp = ChunkResponse.from_bytes(payload, self._limits.max_chunk)
            except (OtaTransferError, ProtocolError) as e:
                log.info("chunk %s@%d: %s (attempt %d)", req.path[:60], req.offset, e, attempt + 1)
                continue
            if resp.status == STATUS_NOT_FOUND:
                return resp
            if (
                resp.status != STATUS_OK
                or resp.offset != req.offset
                or len(resp.data) > req.length
                or (not resp.data and req.offset < resp.total)
                or req.offset + len(resp.data) > resp.total
            ):
                log.info("chunk %s@%d: inconsistent answer", req.path[:60], req.offset)
                continue
            self.stats.payload_bytes += len(resp.data)
            return resp
        raise tuf_errors.DownloadError(
            f"no valid answer for {req.path[:80]}@{req.offset} after "
            f"{self._limits.retries_per_chunk + 1} attempts"
        )

    def _pace(self, nbytes: int) -> None:
        now = self._monotonic()
        if now < self._next_at:
            self._sleep(self._next_at - now)
            now = self._next_at
        self._next_at = now + nbytes / self._limits.rate_bytes_per_s


class FailureLedger:
    """Failed attempts per target file; parks a target that keeps failing."""

    def __init__(
        self,
        path: Path,
        limits: TransferLimits = DEFAULT_LIMITS,
        *,
        state_key: bytes,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._file = SealedFile(path, state_key)
        self._limits = limits
        self._now = now
        self._entries: dict[str, dict[str, float]] = self._load()

    @property
    def tampered(self) -> str:
        """Why the ledger is not trusted ("" when it is): then every target is parked."""
        return self._file.tampered

    def _load(self) -> dict[str, dict[str, float]]:
        body = self._file.load()
        if body is None:
            return {}
        try:
            return {
                str(k): {"failures": float(v["failures"]), "next_at": float(v["next_at"])}
                for k, v in body.items()
            }
        except (KeyError, TypeError, ValueError):
            self._file.tampered = "entries malformed"
            return {}

    def _save(self) -> None:
        if not self._file.tampered:
            self._file.save(self._entries)

    def parked(self, key: str) -> bool:
        if self._file.tampered:
            return True
        e = self._entries.get(key)
        return bool(e and e["failures"] >= self._limits.park_after_failures)

    def may_try(self, key: str) -> bool:
        if self._file.tampered:
            return False
        e = self._entries.get(key)
        return e is None or (not self.parked(key) and self._now() >= e["next_at"])

    def failed(self, key: str) -> bool:
        """Record a failure; True when the target is now parked."""
        e = self._entries.setdefault(key, {"failures": 0.0, "next_at": 0.0})
        e["failures"] += 1
        e["next_at"] = self._now() + backoff_s(int(e["failures"]), self._limits, random.random())
        self._save()
        return self.parked(key)

    def succeeded(self, key: str) -> None:
        if self._entries.pop(key, None) is not None:
            self._save()
