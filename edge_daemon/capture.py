"""Audio sources: where the daemon's 16 kHz mono float32 blocks come from.

Sources are plugins chosen by the config's ``type``: ``scene`` (the procedural city
generator, with ground truth and simulated downstream feedback) and ``file`` (16-bit
PCM WAV). Live capture comes with a later issue. A source yields blocks and may know
the ground truth of each 1 s window; only simulations do.
"""

from __future__ import annotations

import logging
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.config import FileSourceConfig, SceneSourceConfig, SourceConfig
from edge_daemon.errors import CaptureError
from fleet_protocol.features import SAMPLE_RATE

log = logging.getLogger(__name__)
BLOCK_SAMPLES = SAMPLE_RATE * 4
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024


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


class SceneSource:
    def __init__(self, cfg: SceneSourceConfig) -> None:
        from devstack.scene.stream import SceneSpec, render_scene  # simulation only

        self.cfg = cfg
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

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]:
        audio = self._scene.audio
        for i in range(0, len(audio), BLOCK_SAMPLES):
            yield audio[i : i + BLOCK_SAMPLES]

    def truth(self) -> GroundTruth:
        return GroundTruth(self._scene.window_labels, self._scene.speech_frames)

    def feedback(self, window_index: int) -> str | None:
        """Simulated downstream feedback (e.g. dispatch confirmed an ambulance nearby)."""
        if 0 <= window_index < len(self._has_feedback) and self._has_feedback[window_index]:
            return self._scene.window_labels[window_index]
        return None


class WavFileSource:
    def __init__(self, cfg: FileSourceConfig) -> None:
        self.path = cfg.path
        try:
            size = cfg.path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise CaptureError(
                    f"{cfg.path}: {size} bytes exceeds the {MAX_FILE_BYTES} byte cap"
                )
            with wave.open(str(cfg.path), "rb") as w:
                rate, channels, width, frames = (
                    w.getframerate(),
                    w.getnchannels(),
                    w.getsampwidth(),
                    w.getnframes(),
                )
        except FileNotFoundError as e:
            raise CaptureError(f"{cfg.path}: no such file") from e
        except (wave.Error, EOFError) as e:
            raise CaptureError(f"{cfg.path}: not a readable PCM WAV file ({e})") from e
        if rate != SAMPLE_RATE or channels != 1 or width != 2:
            raise CaptureError(
                f"{cfg.path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected "
                f"{SAMPLE_RATE} Hz mono 16-bit — convert with: sox IN -r 16000 -c 1 -b 16 OUT.wav"
            )
        self.duration_s = frames / SAMPLE_RATE

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]:
        with wave.open(str(self.path), "rb") as w:
            while True:
                raw = w.readframes(BLOCK_SAMPLES)
                if not raw:
                    return
                yield np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0

    def truth(self) -> None:
        return None

    def feedback(self, window_index: int) -> None:
        return None


def open_source(cfg: SourceConfig) -> AudioSource:
    if isinstance(cfg, SceneSourceConfig):
        return SceneSource(cfg)
    return WavFileSource(cfg)
