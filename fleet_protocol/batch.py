"""The plaintext inside an upload envelope: a batch of selected samples.

Wire (before encryption): zlib( u32 BE manifest_len | manifest JSON | features ),
where ``features`` is ``n_samples * N_MELS * N_FRAMES`` float16 values, little-endian,
in manifest order. Only log-mel features travel, never waveforms: no raw audio leaves
the device (docs/adr/0006-upload-features-not-audio.md).

Invariants: decoding never inflates more than ``BatchLimits.max_plain`` bytes (zip
bombs stop at the cap); every manifest field is type- and range-checked; decode
raises only ``fleet_protocol.errors.ProtocolError`` subclasses.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet_protocol.errors import MalformedError, ProtocolError, TooLargeError
from fleet_protocol.features import FEATURE_VERSION, N_FRAMES, N_MELS
from fleet_protocol.labels import CLASSES

BATCH_VERSION = 1
_FEATURE_BYTES = N_MELS * N_FRAMES * 2


@dataclass(frozen=True)
class BatchLimits:
    max_compressed: int = 8 * 1024 * 1024
    max_plain: int = 32 * 1024 * 1024
    max_manifest: int = 1024 * 1024
    max_samples: int = 1024


@dataclass(frozen=True)
class SampleMeta:
    """What the device knows about one kept window."""

    sample_id: str  # 32 hex, unique per device
    captured_at_ms: int
    stream_offset_s: float
    predicted: str
    score: float
    feedback: str | None  # label from downstream feedback, if any
    model_sha256: str
    reason: str  # why the selection policy kept it: low_confidence | disagreement | audit


@dataclass(frozen=True)
class Batch:
    device: str
    samples: tuple[SampleMeta, ...]
    features: npt.NDArray[np.float16]  # (n, N_MELS, N_FRAMES)


def encode(batch: Batch) -> bytes:
    feats = np.asarray(batch.features, dtype="<f2")
    if feats.shape != (len(batch.samples), N_MELS, N_FRAMES):
        raise MalformedError(
            f"features shape {feats.shape} does not match {len(batch.samples)} samples"
        )
    manifest = {
        "v": BATCH_VERSION,
        "device": batch.device,
        "feature_version": FEATURE_VERSION,
        "shape": [N_MELS, N_FRAMES],
        "dtype": "float16",
        "samples": [asdict(s) for s in batch.samples],
    }
    mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return zlib.compress(struct.pack(">I", len(mbytes)) + mbytes + feats.tobytes(), level=6)


def _inflate(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise MalformedError(f"batch is not valid zlib: {e}") from e
    if len(out) > limit or d.unconsumed_tail:
        raise TooLargeError(f"batch inflates past {limit} bytes")
    if not d.eof:
        raise MalformedError("batch zlib stream is truncated")
    return out


def _str(obj: dict[str, Any], key: str, max_len: int = 64) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len:
        raise MalformedError(f"field {key!r} must be a string of 1..{max_len} characters")
    return v


def _num(obj: dict[str, Any], key: str, lo: float, hi: float) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise MalformedError(f"field {key!r} must be a finite number")
    if not lo <= v <= hi:
        raise MalformedError(f"field {key!r}={v} outside [{lo}, {hi}]")
    return float(v)


def _label(obj: dict[str, Any], key: str, optional: bool = False) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if v not in CLASSES:
        raise MalformedError(f"field {key!r} is not a known label")
    return str(v)


def _sample(obj: Any) -> SampleMeta:
    if not isinstance(obj, dict) or set(obj) != set(SampleMeta.__dataclass_fields__):
        raise MalformedError("sample entry has missing or unknown fields")
    sid = _str(obj, "sample_id", 32)
    if len(sid) != 32 or any(c not in "0123456789abcdef" for c in sid):
        raise MalformedError("sample_id must be 32 lowercase hex characters")
    return SampleMeta(
        sample_id=sid,
        captured_at_ms=int(_num(obj, "captured_at_ms", 0, 2**53)),
        stream_offset_s=_num(obj, "stream_offset_s", 0, 10**10),
        predicted=str(_label(obj, "predicted")),
        score=_num(obj, "score", 0.0, 1.0),
        feedback=_label(obj, "feedback", optional=True),
        model_sha256=_str(obj, "model_sha256", 64),
        reason=_str(obj, "reason", 32),
    )


def decode(data: bytes, limits: BatchLimits = BatchLimits()) -> Batch:
    """Parse a decrypted batch; raises ``ProtocolError`` subclasses only."""
    if len(data) > limits.max_compressed:
        raise TooLargeError(f"batch of {len(data)} bytes exceeds {limits.max_compressed}")
    plain = _inflate(data, limits.max_plain)
    if len(plain) < 4:
        raise MalformedError("batch too short")
    (mlen,) = struct.unpack(">I", plain[:4])
    if mlen > limits.max_manifest:
        raise TooLargeError(f"manifest of {mlen} bytes exceeds {limits.max_manifest}")
    if 4 + mlen > len(plain):
        raise MalformedError("manifest truncated")
    try:
        manifest = json.loads(plain[4 : 4 + mlen])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MalformedError(f"manifest is not JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise MalformedError("manifest must be an object")
    if manifest.get("v") != BATCH_VERSION or manifest.get("feature_version") != FEATURE_VERSION:
        raise MalformedError("unsupported batch or feature version", reason="unknown_algorithm")
    if manifest.get("shape") != [N_MELS, N_FRAMES] or manifest.get("dtype") != "float16":
        raise MalformedError("unexpected feature shape or dtype")
    raw = manifest.get("samples")
    if not isinstance(raw, list):
        raise MalformedError("samples must be a list")
    if len(raw) > limits.max_samples:
        raise TooLargeError(f"more than {limits.max_samples} samples")
    samples = tuple(_sample(s) for s in raw)
    if len({s.sample_id for s in samples}) != len(samples):
        raise MalformedError("duplicate sample_id in batch")
    body = plain[4 + mlen :]
    if len(body) != len(samples) * _FEATURE_BYTES:
        raise MalformedError(
            f"feature block is {len(body)} bytes, expected {len(samples) * _FEATURE_BYTES}"
        )
    feats = np.frombuffer(body, dtype="<f2").reshape(len(samples), N_MELS, N_FRAMES)
    if not np.isfinite(feats).all():
        raise MalformedError("non-finite feature values")
    return Batch(
        device=_str(manifest, "device"), samples=samples, features=feats.astype(np.float16)
    )


def decode_or_raise(data: bytes, limits: BatchLimits = BatchLimits()) -> Batch:
    """``decode`` with a last-resort guard that maps any stray exception to ``MalformedError``."""
    try:
        return decode(data, limits)
    except ProtocolError:
        raise
    except Exception as e:  # a parser bug must not kill the ingest worker
        raise MalformedError(f"unparseable batch: {type(e).__name__}") from e
