"""One audio file's bytes → 1-s windows at 16 kHz, mono: what the reader feeds the features.

Owns decoding (soundfile: PCM or float WAV, FLAC), the mono mixdown, resampling to
``SAMPLE_RATE`` and the windowing rule. Pure functions on bytes already read and capped
by the caller (``cloud_sidecar.audio_dataset``). Invariants:

- decoding checks the header before reading samples: format WAV/FLAC, a sample rate in
  ``MIN_RATE..MAX_RATE``, at most ``MAX_CHANNELS`` channels and at most
  ``max_seconds`` of audio, so a tiny FLAC that claims hours never allocates them;
- the result is float32 in [-1, 1], mono (the mean of the channels), at 16 kHz
  (``scipy.signal.resample_poly``, the exact rational ratio); any other rate is
  resampled, never refused;
- windows are ``WINDOW_SAMPLES`` long, non-overlapping, from the first sample; a tail of
  at least ``min_tail_s`` becomes one more window completed by repeating the tail (no
  invented digital silence), a shorter tail is dropped;
- for any class but ``silence`` a window is dropped as near-silent when its RMS is under
  ``min_window_dbfs`` or more than ``max_below_loudest_db`` under the file's loudest
  window (a bark followed by seconds of room tone is not four barks); ``silence`` windows
  are kept whatever their level;
- every failure is ``BadAudioError`` with a reason a person can act on.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soundfile as sf
from scipy.signal import resample_poly

from fleet_protocol.features import SAMPLE_RATE, WINDOW_SAMPLES

F32 = npt.NDArray[np.float32]
FORMATS = ("WAV", "WAVEX", "FLAC")
MIN_RATE, MAX_RATE = 4_000, 384_000
MAX_CHANNELS = 8


class BadAudioError(ValueError):
    """One file cannot be used; ``reason`` says why and what to do (the reader names the file)."""


@dataclass(frozen=True)
class WindowRule:
    """The windowing and near-silence rule (values come from ``DatasetConfig``)."""

    min_tail_s: float = 0.5
    min_window_dbfs: float = -60.0
    max_below_loudest_db: float = 40.0


@dataclass(frozen=True)
class FileWindows:
    windows: F32  # (k, WINDOW_SAMPLES)
    quiet_dropped: int
    source_rate: int
    source_channels: int


def decode(data: bytes, max_seconds: float) -> tuple[F32, int, int]:
    """(mono float32 audio at 16 kHz, source sample rate, source channels) from file bytes."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt, rate, channels, frames = f.format, f.samplerate, f.channels, f.frames
            if fmt not in FORMATS:
                raise BadAudioError(f"format {fmt} is not WAV or FLAC; convert it")
            if not MIN_RATE <= rate <= MAX_RATE:
                raise BadAudioError(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
            if not 1 <= channels <= MAX_CHANNELS:
                raise BadAudioError(f"{channels} channels; at most {MAX_CHANNELS} are read")
            if frames > max_seconds * rate:
                raise BadAudioError(
                    f"{frames / rate:.0f} s long, over the {max_seconds:.0f} s per-file cap;"
                    " cut it into shorter files"
                )
            audio = f.read(frames=frames, dtype="float32", always_2d=True)
    except BadAudioError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError, EOFError) as exc:
        raise BadAudioError(f"unreadable audio ({exc}); re-encode it as PCM WAV or FLAC") from exc
    if audio.shape[0] == 0:
        raise BadAudioError("holds no audio samples")
    mono = audio.mean(axis=1, dtype=np.float32) if channels > 1 else audio[:, 0]
    if rate != SAMPLE_RATE:
        g = math.gcd(rate, SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, rate // g).astype(np.float32)
    if not np.all(np.isfinite(mono)):
        raise BadAudioError("holds NaN or infinite samples")
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False), rate, channels


def _dbfs(windows: F32) -> npt.NDArray[np.float64]:
    power = np.mean(windows.astype(np.float64) ** 2, axis=1)
    return np.asarray(10.0 * np.log10(power + 1e-20), dtype=np.float64)


def cut_windows(audio: F32, *, silence: bool, rule: WindowRule) -> tuple[F32, int]:
    """(windows ``(k, WINDOW_SAMPLES)``, near-silent windows dropped) of mono 16 kHz audio."""
    w = WINDOW_SAMPLES
    full = len(audio) // w
    parts = [audio[: full * w].reshape(full, w)]
    tail = audio[full * w :]
    if len(tail) and len(tail) >= rule.min_tail_s * SAMPLE_RATE:
        parts.append(np.tile(tail, -(-w // len(tail)))[:w].reshape(1, w))
    windows = np.concatenate(parts).astype(np.float32, copy=False)
    if silence or not len(windows):
        return windows, 0
    level = _dbfs(windows)
    keep = (level >= rule.min_window_dbfs) & (level >= level.max() - rule.max_below_loudest_db)
    return windows[keep], int((~keep).sum())


def file_windows(
    data: bytes, *, silence: bool, max_seconds: float, rule: WindowRule
) -> FileWindows:
    """Decode, mix down, resample and cut one file's bytes."""
    audio, rate, channels = decode(data, max_seconds)
    windows, quiet = cut_windows(audio, silence=silence, rule=rule)
    return FileWindows(windows, quiet, rate, channels)
