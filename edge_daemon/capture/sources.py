"""Audio sources that need no sound card: the scene generator and WAV/FLAC files.

Owns the ``AudioSource`` protocol every source implements (live, file, scene, and the
capture-process client) and the file checks. Invariants: every block is float32 mono
at ``SAMPLE_RATE`` in [-1, 1]; a file is checked (exists, size cap, readable, rate,
channels) when the source is built, so a bad file fails before the daemon starts, with
one ``CaptureError`` naming the file, what is wrong and the command that fixes it.
``blocks(start)`` skips ``start`` blocks, so a restarted capture process resumes where
the last one stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.config import FileSourceConfig, SceneSourceConfig
from edge_daemon.errors import CaptureError
from fleet_protocol.features import SAMPLE_RATE

log = logging.getLogger(__name__)
BLOCK_SAMPLES = SAMPLE_RATE * 4
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
FIX_HINT = "convert it with: sox IN -r 16000 -c 1 -b 16 OUT.wav (or OUT.flac)"


class AudioSource(Protocol):
    duration_s: float

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]: ...

    def truth(self) -> GroundTruth | None: ...

    def feedback(self, window_index: int) -> str | None: ...


@dataclass(frozen=True)
class GroundTruth:
    """What a simulation knows: the label of each 1 s window and which 10 ms frames hold speech."""

    window_labels: tuple[str, ...]
    speech_frames: npt.NDArray[np.bool_]


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


class SceneSource:
    def __init__(self, cfg: SceneSourceConfig, block_samples: int = BLOCK_SAMPLES) -> None:
        from devstack.scene.stream import SceneSpec, render_scene  # simulation only

        self.cfg = cfg
        self.block_samples = block_samples
        self._scene = render_scene(
            SceneSpec(
                seed=cfg.seed,
                duration_s=cfg.duration_s,
                siren_pattern=cfg.siren_pattern,
                hilo_hz=cfg.hilo_hz,
                speech_rate=cfg.speech_rate,
            )
        )
        self.duration_s = float(cfg.duration_s)
        rng = np.random.default_rng(cfg.seed + 7_919)
        self._has_feedback = rng.random(len(self._scene.window_labels)) < cfg.feedback_coverage

    def blocks(self, start: int = 0) -> Iterator[npt.NDArray[np.float32]]:
        audio = self._scene.audio
        n = self.block_samples
        for i in range(start * n, len(audio), n):
            yield audio[i : i + n]

    def truth(self) -> GroundTruth:
        return GroundTruth(self._scene.window_labels, self._scene.speech_frames)

    def feedback(self, window_index: int) -> str | None:
        """Simulated downstream feedback (e.g. dispatch confirmed an ambulance nearby)."""
        if 0 <= window_index < len(self._has_feedback) and self._has_feedback[window_index]:
            return self._scene.window_labels[window_index]
        return None


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

    def truth(self) -> None:
        return None

    def feedback(self, window_index: int) -> None:
        return None


WavFileSource = FileSource  # the name the walking skeleton used
