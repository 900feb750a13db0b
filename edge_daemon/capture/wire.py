"""The frame format between the capture process and the daemon (one ZeroMQ message each).

Sans-IO: bytes in, ``Frame`` out. Layout (little endian): a fixed header
``magic "SEC1" | kind u8 | state u8 | reserved u16 | seq u64 | captured_ns u64 |
dropped u64 | overruns u64 | reconnects u32 | n u32`` then ``n`` float32 samples
(``kind`` AUDIO/STATUS) or ``n`` bytes of UTF-8 (``kind`` END/ERROR: the reason).

Invariants: ``seq`` is the source's block index, so a gap in ``seq`` is a frame the
consumer never got; counters are totals since that capture process started;
``decode`` rejects anything but an exact, capped frame with ``ValueError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MAGIC = b"SEC1"
HEADER = struct.Struct("<4sBBHQQQQII")
MAX_SAMPLES = 16_000 * 5  # longest frame: 5 s
MAX_TEXT = 2048
AUDIO, STATUS, END, ERROR = 1, 2, 3, 4
STATES = ("starting", "running", "lost", "stopped")


@dataclass(frozen=True)
class Frame:
    kind: int
    state: str
    seq: int
    captured_ns: int
    dropped: int
    overruns: int
    reconnects: int
    audio: npt.NDArray[np.float32]
    text: str = ""


def encode(f: Frame) -> bytes:
    if f.kind in (END, ERROR):
        body = f.text.encode()[:MAX_TEXT]
    else:
        body = np.ascontiguousarray(f.audio, dtype="<f4").tobytes()
    n = len(body) if f.kind in (END, ERROR) else len(f.audio)
    head = HEADER.pack(
        MAGIC,
        f.kind,
        STATES.index(f.state),
        0,
        f.seq,
        f.captured_ns,
        f.dropped,
        f.overruns,
        f.reconnects,
        n,
    )
    return head + body


def decode(data: bytes) -> Frame:
    if len(data) < HEADER.size or len(data) > HEADER.size + 4 * MAX_SAMPLES:
        raise ValueError(f"capture frame of {len(data)} bytes is out of bounds")
    magic, kind, state, _, seq, t_ns, dropped, overruns, reconnects, n = HEADER.unpack_from(data)
    if magic != MAGIC or kind not in (AUDIO, STATUS, END, ERROR) or state >= len(STATES):
        raise ValueError("not a capture frame")
    body = data[HEADER.size :]
    if kind in (END, ERROR):
        if n != len(body) or n > MAX_TEXT:
            raise ValueError("bad capture frame text length")
        audio = np.zeros(0, dtype=np.float32)
        text = body.decode("utf-8", errors="replace")
    else:
        if n != len(body) // 4 or len(body) % 4 or n > MAX_SAMPLES:
            raise ValueError("bad capture frame sample count")
        audio = np.frombuffer(body, dtype="<f4").astype(np.float32)
        text = ""
    return Frame(kind, STATES[state], seq, t_ns, dropped, overruns, reconnects, audio, text)
