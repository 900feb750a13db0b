"""Golden clips: feature windows with their expected labels, shipped with an adapter.

The training run picks a few windows per class from the base's golden set, writes them
into the signed bundle with the int8 candidate's accuracy on exactly them, and the
release signs them into the TUF repository as a target of their own; the device runs
the merged candidate on them in its shadow session before it switches (docs/adr/0016).
Both sides use this one format:

    b"GOLD1\\n" + u32 big-endian header length + JSON header
    {"shape": [n, d1, ...], "labels": [n ints]} + n windows, float16 little-endian, C order

float16 is the upload representation's precision and halves what every device downloads
with each update; both sides score the clips as parsed (float16 widened to float32).

Invariants: at most ``MAX_GOLDEN_BYTES`` and ``MAX_GOLDEN_WINDOWS``; the payload has
exactly the size the header announces; every value finite; labels non-negative
integers, one per window. Bytes in, arrays out (``parse_golden`` raises only
``GoldenError``); no pickle, no file I/O.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet_model.errors import GoldenError

MAGIC = b"GOLD1\n"
MAX_GOLDEN_BYTES = 4 * 1024 * 1024
MAX_GOLDEN_WINDOWS = 512
MAX_HEADER_BYTES = 64 * 1024
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def encode_golden(x: F32, y: I64) -> bytes:
    """The golden clips ``x`` (windows) with labels ``y`` in the shipped format."""
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype="<f2")
    labels = [int(v) for v in np.asarray(y).tolist()]
    if x.ndim < 1 or x.shape[0] != len(labels) or not labels:
        raise GoldenError("one label per window, at least one window")
    header = json.dumps({"shape": list(x.shape), "labels": labels}).encode()
    data = MAGIC + struct.pack(">I", len(header)) + header + x.tobytes()
    parse_golden(data)  # what is shipped is what a device accepts
    return data


def parse_golden(data: bytes) -> tuple[F32, I64]:
    """Windows and labels; ``GoldenError`` for anything but a well-formed, bounded file."""
    if len(data) > MAX_GOLDEN_BYTES:
        raise GoldenError(f"golden clips: {len(data)} bytes exceeds {MAX_GOLDEN_BYTES}")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise GoldenError("golden clips: not GOLD1")
    (size,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if size > MAX_HEADER_BYTES or start + size > len(data):
        raise GoldenError("golden clips: header out of bounds")
    try:
        header: Any = json.loads(data[start : start + size])
        shape, labels = header["shape"], header["labels"]
    except (ValueError, KeyError, TypeError) as e:
        raise GoldenError(f"golden clips: bad header ({e})") from e
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        or not isinstance(labels, list)
        or len(labels) != shape[0]
        or shape[0] > MAX_GOLDEN_WINDOWS
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels)
    ):
        raise GoldenError("golden clips: shape or labels malformed")
    payload = data[start + size :]
    if len(payload) != 2 * math.prod(shape):
        raise GoldenError("golden clips: payload size does not match the header")
    x = np.frombuffer(payload, dtype="<f2").reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise GoldenError("golden clips: non-finite values")
    return x, np.asarray(labels, dtype=np.int64)


def golden_accuracy(probs: npt.NDArray[Any], labels: I64) -> float:
    """Share of windows whose top-1 class is the expected label."""
    if len(labels) == 0 or probs.shape[0] != len(labels):
        raise GoldenError("one prediction per golden window")
    return float(np.mean(np.argmax(probs, axis=1) == labels))
