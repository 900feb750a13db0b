"""Log-mel features: the one implementation used by the device and by training.

This module is part of the edge-cloud contract: the model the cloud trains and the
adapter it ships are only valid for features computed exactly like this. Pure numpy,
no I/O. Invariants: input is float32 mono at ``SAMPLE_RATE`` in [-1, 1]; a window of
``WINDOW_SAMPLES`` gives a ``(N_MELS, N_FRAMES)`` float32 array; ``FEATURE_VERSION``
changes whenever the numbers would.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

FEATURE_VERSION = "logmel-v1"
SAMPLE_RATE = 16_000
WINDOW_SAMPLES = SAMPLE_RATE  # 1 s windows, non-overlapping
N_FFT = 512
WIN_LENGTH = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 64
F_MIN = 50.0
F_MAX = 8_000.0
N_FRAMES = 1 + (WINDOW_SAMPLES - WIN_LENGTH) // HOP  # 98
# Fixed affine normalisation of log-mel energies (keeps absolute level: silence stays
# distinguishable from quiet noise). Chosen from the scene generator's range.
LOG_OFFSET = 1e-6
NORM_MEAN = -7.0
NORM_STD = 4.0

FloatArray = npt.NDArray[np.float32]


def _hz_to_mel(f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=1)
def mel_filterbank() -> FloatArray:
    """Triangular HTK-style mel filters, shape ``(N_MELS, N_FFT // 2 + 1)``."""
    n_bins = N_FFT // 2 + 1
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, n_bins)
    mel_points = np.linspace(_hz_to_mel(np.array(F_MIN)), _hz_to_mel(np.array(F_MAX)), N_MELS + 2)
    hz = _mel_to_hz(mel_points)
    fb = np.zeros((N_MELS, n_bins), dtype=np.float64)
    for i in range(N_MELS):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        up = (fft_freqs - lo) / (mid - lo)
        down = (hi - fft_freqs) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(up, down))
    return fb.astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> FloatArray:
    return np.hanning(WIN_LENGTH + 1)[:-1].astype(np.float32)


def log_mel_batch(windows: FloatArray) -> FloatArray:
    """Features of ``(B, WINDOW_SAMPLES)`` audio windows: ``(B, N_MELS, N_FRAMES)`` float32."""
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES:
        raise ValueError(f"expected (batch, {WINDOW_SAMPLES}) float32 audio, got shape {x.shape}")
    idx = np.arange(WIN_LENGTH)[None, :] + HOP * np.arange(N_FRAMES)[:, None]
    frames = x[:, idx] * _window()  # (B, T, WIN)
    spec = np.fft.rfft(frames, n=N_FFT, axis=-1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)  # (B, T, F)
    mel = power @ mel_filterbank().T  # (B, T, M)
    logmel = (np.log(mel + LOG_OFFSET) - NORM_MEAN) / NORM_STD
    return np.ascontiguousarray(logmel.transpose(0, 2, 1), dtype=np.float32)


def log_mel(window: FloatArray) -> FloatArray:
    """Features of one window: ``(N_MELS, N_FRAMES)``."""
    one: FloatArray = log_mel_batch(np.asarray(window, dtype=np.float32)[None, :])[0]
    return one
