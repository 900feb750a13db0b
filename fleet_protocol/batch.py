"""The plaintext inside an upload envelope: a batch of selected samples.

Wire (before encryption): zlib( u32 BE manifest_len | manifest JSON | features ),
where ``features`` is ``n_samples * N_BANDS * N_FRAMES`` float16 values, little-endian,
in manifest order; the manifest is a ``BatchManifest`` (a typed ``WireModel``). Only
third-octave 120 ms band energies travel, never waveforms: no raw audio leaves the device
(docs/adr/0006-upload-features-not-audio.md).

Version 2 (this one) carries no label: a device has none. Labels come from outside the
device, through the sidecar's label channel (``fleet_protocol.labels``), and are joined
to samples by device and capture time (``captured_at_ms``, the wall-clock time of the
window's first sample).

Invariants: decoding never inflates more than ``BatchLimits.max_plain`` bytes (zip
bombs stop at the cap); every manifest field is type- and range-checked; decode
raises only ``fleet_protocol.errors.ProtocolError`` subclasses.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import ConfigDict, Field, ValidationError

from fleet_protocol.errors import MalformedError, ProtocolError, TooLargeError
from fleet_protocol.features import FEATURE_VERSION, N_BANDS, N_FRAMES
from fleet_protocol.labels import ClassName
from fleet_protocol.topics import DeviceId
from fleet_protocol.wire import WireModel

BATCH_VERSION = 2
MAX_SAMPLES = 1024
_FEATURE_BYTES = N_BANDS * N_FRAMES * 2
SelectionReason = Literal["low_confidence", "audit"]


@dataclass(frozen=True)
class BatchLimits:
    max_compressed: int = 8 * 1024 * 1024
    max_plain: int = 32 * 1024 * 1024
    max_manifest: int = 1024 * 1024
    max_samples: int = MAX_SAMPLES


class SampleMeta(WireModel):
    """What the device knows about one kept window (never a label: it has none)."""

    ABSTRACT: ClassVar[bool] = True  # part of BatchManifest

    sample_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="random, unique per device")
    captured_at_ms: int = Field(
        ge=0, le=2**53, description="wall-clock capture time of the window's first sample"
    )
    stream_offset_s: float = Field(ge=0, le=1e10, description="offset in the daemon's stream")
    predicted: ClassName
    score: float = Field(ge=0, le=1)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    reason: SelectionReason = Field(
        description="why it was kept: low_confidence (hard case) or audit (a random,"
        " representative sample of everything kept)"
    )


class BatchManifest(WireModel):
    """The JSON head of a decrypted batch (``encode``/``decode``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "v": 2,
                    "device": "pi-07",
                    "feature_version": "third120-v1",
                    "shape": [20, 8],
                    "dtype": "float16",
                    "samples": [
                        {
                            "sample_id": "5f0c" * 8,
                            "captured_at_ms": 1764662400000,
                            "stream_offset_s": 3600.0,
                            "predicted": "siren",
                            "score": 0.41,
                            "model_sha256": "ab" * 32,
                            "reason": "low_confidence",
                        }
                    ],
                }
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = BatchLimits.max_manifest

    v: int = Field(ge=0, le=2**31)
    device: DeviceId
    feature_version: str = Field(max_length=64)
    shape: tuple[int, int]
    dtype: Literal["float16"]
    samples: tuple[SampleMeta, ...] = Field(max_length=MAX_SAMPLES)


@dataclass(frozen=True)
class Batch:
    device: str
    samples: tuple[SampleMeta, ...]
    features: npt.NDArray[np.float16]  # (n, N_BANDS, N_FRAMES)


def encode(batch: Batch) -> bytes:
    feats = np.asarray(batch.features, dtype="<f2")
    if feats.shape != (len(batch.samples), N_BANDS, N_FRAMES):
        raise MalformedError(
            f"features shape {feats.shape} does not match {len(batch.samples)} samples"
        )
    manifest = BatchManifest(
        v=BATCH_VERSION,
        device=batch.device,
        feature_version=FEATURE_VERSION,
        shape=(N_BANDS, N_FRAMES),
        dtype="float16",
        samples=batch.samples,
    )
    mbytes = manifest.to_bytes()
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


def _manifest(data: bytes) -> BatchManifest:
    try:
        m = BatchManifest.model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as e:
        raise MalformedError(f"batch manifest is invalid: {str(e)[:300]}") from e
    if m.v != BATCH_VERSION or m.feature_version != FEATURE_VERSION:
        raise MalformedError("unsupported batch or feature version", reason="unknown_algorithm")
    if m.shape != (N_BANDS, N_FRAMES):
        raise MalformedError(f"unexpected feature shape {m.shape}")
    return m


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
    manifest = _manifest(plain[4 : 4 + mlen])
    samples = manifest.samples
    if len(samples) > limits.max_samples:
        raise TooLargeError(f"more than {limits.max_samples} samples")
    if len({s.sample_id for s in samples}) != len(samples):
        raise MalformedError("duplicate sample_id in batch")
    body = plain[4 + mlen :]
    if len(body) != len(samples) * _FEATURE_BYTES:
        raise MalformedError(
            f"feature block is {len(body)} bytes, expected {len(samples) * _FEATURE_BYTES}"
        )
    feats = np.frombuffer(body, dtype="<f2").reshape(len(samples), N_BANDS, N_FRAMES)
    if not np.isfinite(feats).all():
        raise MalformedError("non-finite feature values")
    return Batch(device=manifest.device, samples=samples, features=feats.astype(np.float16))


def decode_or_raise(data: bytes, limits: BatchLimits = BatchLimits()) -> Batch:
    """``decode`` with a last-resort guard that maps any stray exception to ``MalformedError``."""
    try:
        return decode(data, limits)
    except ProtocolError:
        raise
    except Exception as e:  # a parser bug must not kill the ingest worker
        raise MalformedError(f"unparseable batch: {type(e).__name__}") from e
