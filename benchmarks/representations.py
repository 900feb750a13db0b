"""Candidate upload representations (research prototypes, not the wire format).

Owns: the feature functions the privacy attack bench compares: the upload
(``fleet_protocol.features``, third-octave bands at 120 ms, "third-120ms"), the
log-mel it replaced (64 mel bands at 10 ms, "logmel64-10ms", kept here only as the
baseline; ADR 0006) and other candidates, and each one's band matrix so that an
attacker can map it back to a linear spectrum. Nothing here is used by the device or
the cloud.

Every candidate is ``log(band energies)`` of 1 s windows, computed from the upload's
own 10 ms power spectra (``fleet_protocol.features.power_frames``: 512-point FFT of
25 ms Hann frames, hop 10 ms, 98 frames), then band-summed with a filterbank and
*averaged over time blocks* of ``pool`` frames (a Welch estimate over ``pool * 10 ms``).
Invariants: a window of 16000 samples gives ``(n_bands, 98 // pool)`` float32; pooling
drops the last ``98 % pool`` frames; log offset and normalisation as
``fleet_protocol.features``; "third-120ms" equals ``fleet_protocol.features.features_batch``
exactly (``tests/unit/test_feature_parity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from fleet_protocol import features as F

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Representation:
    """``bands``: "mel" (HTK mel from 50 Hz) or "third" (base-2 third-octave bands, 50 Hz -
    7.1 kHz, ANSI S1.11 nominal centres 63 Hz ... 6.3 kHz); ``n_bands`` for mel;
    ``pool``: 10 ms frames averaged into one output frame."""

    name: str
    bands: str
    n_bands: int
    pool: int

    @property
    def frame_ms(self) -> int:
        return 10 * self.pool

    def filterbank(self) -> F32:
        return _filterbank(self.bands, self.n_bands)

    def __call__(self, windows: F32) -> F32:
        p = power_frames(windows)  # (B, 98, 257)
        e = p @ self.filterbank().T  # (B, 98, nb)
        t = (e.shape[1] // self.pool) * self.pool
        pooled = e[:, :t].reshape(e.shape[0], -1, self.pool, e.shape[2]).mean(axis=2)
        out = (np.log(pooled + F.LOG_OFFSET) - F.NORM_MEAN) / F.NORM_STD
        return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)

    def bytes_per_window(self) -> int:
        return 2 * self.n_bands_actual * (F.N_STFT_FRAMES // self.pool)  # float16

    @property
    def n_bands_actual(self) -> int:
        return int(self.filterbank().shape[0])


CANDIDATES: tuple[Representation, ...] = (
    Representation("logmel64-10ms", "mel", 64, 1),  # the upload until ADR 0006 rev. 2
    Representation("logmel32-40ms", "mel", 32, 4),
    Representation("logmel64-100ms", "mel", 64, 10),
    Representation("third-40ms", "third", 0, 4),
    Representation("third-120ms", "third", 0, 12),  # the upload (CENSE-like)
    Representation("logmel16-120ms", "mel", 16, 12),
    Representation("logmel32-240ms", "mel", 32, 24),
)
BY_NAME = {r.name: r for r in CANDIDATES}


power_frames = F.power_frames
MEL_F_MIN, MEL_F_MAX = 50.0, 8_000.0  # the replaced log-mel's range


@lru_cache(maxsize=16)
def _filterbank(kind: str, n_bands: int) -> F32:
    if kind == "mel":
        n_bins = F.N_FFT // 2 + 1
        freqs = np.linspace(0.0, F.SAMPLE_RATE / 2, n_bins)
        m = np.linspace(
            2595 * np.log10(1 + MEL_F_MIN / 700), 2595 * np.log10(1 + MEL_F_MAX / 700), n_bands + 2
        )
        hz = 700 * (10 ** (m / 2595) - 1)
        fb = np.zeros((n_bands, n_bins))
        for i in range(n_bands):
            lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
            fb[i] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        return fb.astype(np.float32)
    if kind == "third":
        return F.band_filterbank()
    raise ValueError(f"unknown band kind {kind}")
