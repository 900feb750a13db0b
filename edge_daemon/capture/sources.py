"""The ``AudioSource`` protocol, capture timelines, and WAV/FLAC file sources.

Owns the ``AudioSource`` protocol every source implements (live, file, the
capture-process client, and devstack's simulated city, which reaches the daemon through
this same interface), ``Timeline`` (capture time of each delivered sample) and the file
checks. Invariants: every block is float32 mono at ``SAMPLE_RATE`` in [-1, 1]; a source
knows only audio and time, never labels or ground truth; a file is checked (exists, size
cap, readable, rate, channels) when the source is built, so a bad file fails before the
daemon starts, with one ``CaptureError`` naming the file, what is wrong and the command
that fixes it. ``blocks(start)`` skips ``start`` blocks, so a restarted capture process
resumes where the last one stopped.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.config import FileSourceConfig
from edge_daemon.errors import CaptureError
from fleet_protocol.features import SAMPLE_RATE

log = logging.getLogger(__name__)
BLOCK_SAMPLES = SAMPLE_RATE * 4
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
FIX_HINT = "convert it with: sox IN -r 16000 -c 1 -b 16 OUT.wav (or OUT.flac)"


class AudioSource(Protocol):
    """What the daemon reads audio from: a microphone, a file, or a simulation (devstack).

    ``blocks()`` yields float32 mono blocks at ``SAMPLE_RATE`` (an empty block is a
    heartbeat: alive, no audio); ``captured_at_ms(i)`` is the wall-clock time (Unix ms)
    at which the ``i``-th sample ``blocks()`` delivered was captured, so kept windows
    carry their capture time and labels from the city can be joined to them.
    """

    duration_s: float

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]: ...

    def captured_at_ms(self, sample_index: int) -> int: ...


class Timeline:
    """Maps delivered sample indices to capture times, from anchors set as blocks arrive.

    Bounded: the oldest anchors are forgotten (``max_anchors``); an index before the
    oldest kept anchor maps from that anchor. Between anchors time runs at the sample
    rate, so a gap in capture (dropped frames) shows as a jump at the next anchor.
    """

    def __init__(self, start_ms: int | None = None, max_anchors: int = 4096) -> None:
        self._idx: deque[int] = deque(maxlen=max_anchors)
        self._ms: deque[int] = deque(maxlen=max_anchors)
        if start_ms is not None:
            self.mark(0, start_ms)

    def mark(self, sample_index: int, epoch_ms: int) -> None:
        if self._idx and sample_index <= self._idx[-1]:
            return  # anchors only move forward
        self._idx.append(sample_index)
        self._ms.append(epoch_ms)

    def at(self, sample_index: int) -> int:
        if not self._idx:
            return int(time.time() * 1000)
        i = max(0, bisect.bisect_right(self._idx, sample_index) - 1)
        return self._ms[i] + (sample_index - self._idx[i]) * 1000 // SAMPLE_RATE


def paced(
    blocks: Iterator[npt.NDArray[np.float32]], start_s: float = 0.0
) -> Iterator[npt.NDArray[np.float32]]:
    """Release blocks no faster than real time, as a sound card would."""
    t0 = time.monotonic() - start_s
    played = 0
    for b in blocks:
        played += len(b)
        delay = t0 + played / SAMPLE_RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield b


class FileSource:
    """WAV or FLAC (any PCM width or float) at 16 kHz mono, read through libsndfile."""

    def __init__(self, cfg: FileSourceConfig, block_samples: int = BLOCK_SAMPLES) -> None:
        import soundfile as sf

        self.path = cfg.path
        self.realtime = cfg.realtime
        self.block_samples = block_samples
        p = cfg.path
        try:
            size = p.stat().st_size
        except FileNotFoundError as e:
            raise CaptureError(f"{p}: no such file; check source.path in the config") from e
        except OSError as e:
            raise CaptureError(f"{p}: cannot read ({e.strerror}); check its permissions") from e
        if p.is_dir():
            raise CaptureError(f"{p}: is a directory; source.path must name a WAV or FLAC file")
        if size > MAX_FILE_BYTES:
            raise CaptureError(
                f"{p}: {size} bytes exceeds the {MAX_FILE_BYTES} byte cap; split it "
                "(sox IN OUT.wav trim 0 3600 : newfile : restart)"
            )
        try:
            info = sf.info(str(p))
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise CaptureError(
                f"{p}: not a readable WAV or FLAC file ({e}); if it is audio in another "
                f"format, {FIX_HINT}"
            ) from e
        if info.format not in ("WAV", "WAVEX", "FLAC"):
            raise CaptureError(f"{p}: {info.format} audio is not supported; {FIX_HINT}")
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            raise CaptureError(
                f"{p}: {info.samplerate} Hz, {info.channels} channel(s); expected "
                f"{SAMPLE_RATE} Hz mono; {FIX_HINT}"
            )
        self.duration_s = info.frames / SAMPLE_RATE
        start = cfg.start_time_ms if cfg.start_time_ms is not None else int(time.time() * 1000)
        self._timeline = Timeline(start)  # a recording: its samples are evenly spaced

    def blocks(self, start: int = 0) -> Iterator[npt.NDArray[np.float32]]:
        gen = self._read(start)
        return paced(gen, start * self.block_samples / SAMPLE_RATE) if self.realtime else gen

    def _read(self, start: int) -> Iterator[npt.NDArray[np.float32]]:
        import soundfile as sf

        try:
            with sf.SoundFile(str(self.path)) as f:
                if start:
                    f.seek(min(start * self.block_samples, f.frames))
                while True:
                    block = f.read(self.block_samples, dtype="float32", always_2d=False)
                    if len(block) == 0:
                        return
                    yield np.ascontiguousarray(block, dtype=np.float32)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise CaptureError(
                f"{self.path}: read failed mid-file ({e}); the file is truncated or corrupt; "
                f"re-export it ({FIX_HINT})"
            ) from e

    def captured_at_ms(self, sample_index: int) -> int:
        return self._timeline.at(sample_index)
