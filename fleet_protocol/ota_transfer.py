"""Chunked OTA transfer over MQTT 5 request/response (sans-IO).

A device asks for one byte range of one repository file on ``fleet/v1/<device>/ota/request``
(``ChunkRequest``, JSON), with the MQTT 5 response topic ``fleet/v1/<device>/ota/response``
and fresh correlation data; the sidecar answers there with the same correlation data
and a ``ChunkResponse`` (binary: ``OTA1``, a 2-byte header length, a JSON header
``{"status", "offset", "total"}``, then the bytes). This module builds and parses both
and decides what a server answers (``answer``); sockets, files and timers are the
callers' (edge_daemon/ota_fetch.py, cloud_sidecar/ota_serve.py).

Invariants:
- a request names a file by a path of exactly two components: ``metadata/<TUF file>``
  (``topics.TUF_METADATA_FILE_RE``) or ``targets/<sha256>.<safe name>``; nothing else
  is parsed into a path, so no request reaches outside the repository;
- ``length`` is 1..``TransferLimits.max_chunk``; a response carries at most the
  requested length, at the requested offset; every parser caps bytes first;
- status codes follow HTTP where they overlap (200, 400, 404, 416), so the device's
  fetcher maps 404 to python-tuf's "no such file" exactly as over HTTP.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import ConfigDict, Field

from fleet_protocol.errors import MalformedError, TooLargeError
from fleet_protocol.topics import TUF_METADATA_FILE_RE
from fleet_protocol.wire import UInt63, WireModel

MAGIC = b"OTA1"
_TARGET_FILE_RE = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PATH_PATTERN = (
    r"^(metadata/(?:[1-9][0-9]{0,9}\.)?(?:root|targets|snapshot|timestamp)\.json"
    r"|targets/[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"
)
_HEADER_MAX = 256

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_NOT_FOUND = 404
STATUS_BAD_RANGE = 416


@dataclass(frozen=True)
class TransferLimits:
    """Caps and pacing of one device's transfers (typed config, not scattered constants)."""

    max_chunk: int = 64 * 1024
    max_file: int = 16 * 1024 * 1024
    request_timeout_s: float = 10.0
    retries_per_chunk: int = 4
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    rate_bytes_per_s: int = 1024 * 1024
    park_after_failures: int = 5


DEFAULT_LIMITS = TransferLimits()


class ChunkRequest(WireModel):
    """Device → sidecar: bytes ``[offset, offset + length)`` of one repository file."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"length": 65536, "offset": 0, "path": "metadata/timestamp.json"},
                {"length": 65536, "offset": 131072, "path": f"targets/{'ab' * 32}.adapter-v3.bin"},
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = 512

    path: Annotated[
        str,
        Field(
            max_length=220, pattern=PATH_PATTERN, description="metadata/<file> or targets/<file>"
        ),
    ]
    offset: Annotated[UInt63, Field(description="first byte wanted")]
    length: Annotated[int, Field(ge=1, le=16 * 1024 * 1024, description="bytes wanted (capped)")]


@dataclass(frozen=True)
class ChunkResponse:
    status: int
    offset: int
    total: int
    data: bytes

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {"offset": self.offset, "status": self.status, "total": self.total},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        return MAGIC + struct.pack(">H", len(header)) + header + self.data

    @classmethod
    def from_bytes(cls, payload: bytes, max_data: int) -> ChunkResponse:
        if len(payload) > len(MAGIC) + 2 + _HEADER_MAX + max_data:
            raise TooLargeError(f"chunk response of {len(payload)} bytes", reason="too_large")
        if payload[:4] != MAGIC or len(payload) < 6:
            raise MalformedError("not a chunk response", reason="malformed")
        (n,) = struct.unpack(">H", payload[4:6])
        if n > _HEADER_MAX or len(payload) < 6 + n:
            raise MalformedError("chunk response header length", reason="malformed")
        try:
            h = json.loads(payload[6 : 6 + n])
            status, offset, total = h["status"], h["offset"], h["total"]
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedError(f"chunk response header: {e}", reason="malformed") from e
        for v in (status, offset, total):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
                raise MalformedError("chunk response header values", reason="malformed")
        data = payload[6 + n :]
        if len(data) > max_data:
            raise TooLargeError(f"chunk of {len(data)} bytes > {max_data}", reason="too_large")
        return cls(status, offset, total, data)


def parse_path(path: str) -> tuple[str, str]:
    """``(directory, file name)`` of a request path, or ``MalformedError``."""
    directory, _, name = path.partition("/")
    ok = (directory == "metadata" and TUF_METADATA_FILE_RE.fullmatch(name)) or (
        directory == "targets" and _TARGET_FILE_RE.fullmatch(name)
    )
    if not ok or "/" in name or ".." in name:
        raise MalformedError(f"bad OTA path {path[:80]!r}", reason="bad_path")
    return directory, name


def answer(
    payload: bytes,
    read: Callable[[str, str, int, int], tuple[bytes, int] | None],
    limits: TransferLimits = DEFAULT_LIMITS,
) -> ChunkResponse:
    """What the server answers to one request; ``read(dir, name, offset, length)``
    returns ``(bytes, total size)`` or ``None`` when the file does not exist."""
    try:
        req = ChunkRequest.from_bytes(payload)
        directory, name = parse_path(req.path)
    except (MalformedError, TooLargeError):
        return ChunkResponse(STATUS_BAD_REQUEST, 0, 0, b"")
    found = read(directory, name, req.offset, min(req.length, limits.max_chunk))
    if found is None:
        return ChunkResponse(STATUS_NOT_FOUND, req.offset, 0, b"")
    data, total = found
    if req.offset > total:
        return ChunkResponse(STATUS_BAD_RANGE, req.offset, total, b"")
    return ChunkResponse(STATUS_OK, req.offset, total, data)


def backoff_s(failures: int, limits: TransferLimits, jitter: float = 0.0) -> float:
    """Exponential backoff after ``failures`` consecutive failures (``jitter`` in [0, 1))."""
    base = min(limits.backoff_max_s, limits.backoff_base_s * 2 ** max(0, failures - 1))
    return float(base * (1.0 + jitter / 2.0))
