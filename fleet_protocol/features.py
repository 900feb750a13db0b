"""Upload features: the one implementation used by the device and by training.

What a device computes, classifies, keeps and uploads for each 1 s window is the log
energy in ``N_BANDS`` third-octave bands (base 2, centres 40 Hz ... 6.3 kHz; the 40, 50
and 80 Hz bands hold no bin of the 512-point FFT and are left out, so 20 bands remain)
averaged over ``FRAME_MS`` = 120 ms blocks: ``(N_BANDS, N_FRAMES)`` = ``(20, 8)``.
That is the coarse spectro-temporal resolution of noise-monitoring sensor networks
(CENSE: third octaves at 125 ms), chosen because speech rebuilt from it is not
intelligible (``docs/adr/0006-upload-features-not-audio.md``, revision 2, with the
attack measurements), while sound events stay classifiable.

This module is part of the edge-cloud contract: the model the cloud trains and the
adapter it ships are only valid for features computed exactly like this. Pure numpy,
no I/O. Invariants: input is float32 mono at ``SAMPLE_RATE`` in [-1, 1]; a window of
``WINDOW_SAMPLES`` gives a ``(N_BANDS, N_FRAMES)`` float32 array; the short-time power
spectra underneath (``N_STFT_FRAMES`` frames of 25 ms Hann, hop 10 ms, 512-point FFT)
never leave this module's callers on the device; ``FEATURE_VERSION`` changes whenever
the numbers would.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

FEATURE_VERSION = "third120-v1"
SAMPLE_RATE = 16_000
WINDOW_SAMPLES = SAMPLE_RATE  # 1 s windows, non-overlapping
N_FFT = 512
WIN_LENGTH = 400  # 25 ms
HOP = 160  # 10 ms
N_STFT_FRAMES = 1 + (WINDOW_SAMPLES - WIN_LENGTH) // HOP  # 98 short-time spectra per window
POOL = 12  # short-time frames averaged into one feature frame
FRAME_MS = POOL * HOP * 1000 // SAMPLE_RATE  # 120
N_FRAMES = N_STFT_FRAMES // POOL  # 8 (the last 2 short-time frames are not used)
# Third-octave bands, base 2: centres 1000 * 2**(k/3) Hz for k in [-14, 8] (39 Hz ... 6.3 kHz),
# less the three (k = -14, -13, -11) that hold no FFT bin at 31.25 Hz spacing
BAND_INDICES = (-12, *range(-10, 9))
N_BANDS = len(BAND_INDICES)  # 20
# Fixed affine normalisation of log band energies (keeps absolute level: silence stays
# distinguishable from quiet noise).
LOG_OFFSET = 1e-6
NORM_MEAN = -7.0
NORM_STD = 4.0

FloatArray = npt.NDArray[np.float32]


@lru_cache(maxsize=1)
def band_filterbank() -> FloatArray:
    """Rectangular third-octave filters over FFT bins, shape ``(N_BANDS, N_FFT // 2 + 1)``.

    A bin belongs to the band whose edges ``fc * 2**(+-1/6)`` hold its centre frequency;
    every band holds at least one bin at this FFT size (``tests/unit/test_feature_parity.py``).
    """
    n_bins = N_FFT // 2 + 1
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, n_bins)
    rows = []
    for k in BAND_INDICES:
        fc = 1000.0 * 2.0 ** (k / 3.0)
        lo, hi = fc * 2.0 ** (-1 / 6), fc * 2.0 ** (1 / 6)
        rows.append(((freqs >= lo) & (freqs < hi)).astype(np.float32))
    return np.stack(rows)


@lru_cache(maxsize=1)
def hann_window() -> FloatArray:
    return np.hanning(WIN_LENGTH + 1)[:-1].astype(np.float32)


def power_frames(windows: FloatArray) -> FloatArray:
    """Short-time power spectra of ``(B, WINDOW_SAMPLES)`` audio: ``(B, N_STFT_FRAMES, 257)``."""
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES:
        raise ValueError(f"expected (batch, {WINDOW_SAMPLES}) float32 audio, got shape {x.shape}")
    idx = np.arange(WIN_LENGTH)[None, :] + HOP * np.arange(N_STFT_FRAMES)[:, None]
    spec = np.fft.rfft(x[:, idx] * hann_window(), n=N_FFT, axis=-1)
    return (spec.real**2 + spec.imag**2).astype(np.float32)


def features_batch(windows: FloatArray) -> FloatArray:
    """Features of ``(B, WINDOW_SAMPLES)`` audio windows: ``(B, N_BANDS, N_FRAMES)`` float32."""
    power = power_frames(windows)  # (B, 98, 257)
    bands = power @ band_filterbank().T  # (B, 98, N_BANDS)
    b = bands.shape[0]
    pooled = bands[:, : N_FRAMES * POOL].reshape(b, N_FRAMES, POOL, N_BANDS).mean(axis=2)
    out = (np.log(pooled + LOG_OFFSET) - NORM_MEAN) / NORM_STD
    return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)


def features(window: FloatArray) -> FloatArray:
    """Features of one window: ``(N_BANDS, N_FRAMES)``."""
    one: FloatArray = features_batch(np.asarray(window, dtype=np.float32)[None, :])[0]
    return one
