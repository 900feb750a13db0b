"""Candidate upload representations (research prototypes, not the wire format).

Owns: the feature functions the privacy attack bench compares with today's upload
(``fleet_protocol.features``, 64 mel bands at 10 ms), and each one's band matrix so
that an attacker can map it back to a linear spectrum. Nothing here is used by the
device or the cloud; the chosen one is integrated into ``fleet_protocol`` by the lead.

Every candidate is ``log(band energies)`` of 1 s windows, computed from the same 10 ms
power spectra as today's log-mel (512-point FFT of 25 ms Hann frames, hop 10 ms, 98
frames), then band-summed with a filterbank and *averaged over time blocks* of
``pool`` frames (a Welch estimate over ``pool * 10 ms``). Invariants: a window of
16000 samples gives ``(n_bands, 98 // pool)`` float32; pooling drops the last
``98 % pool`` frames; log offset and normalisation as ``fleet_protocol.features``.
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
        return 2 * self.n_bands_actual * (F.N_FRAMES // self.pool)  # float16

    @property
    def n_bands_actual(self) -> int:
        return int(self.filterbank().shape[0])


CANDIDATES: tuple[Representation, ...] = (
    Representation("logmel64-10ms", "mel", 64, 1),  # today's upload
    Representation("logmel32-40ms", "mel", 32, 4),
    Representation("logmel64-100ms", "mel", 64, 10),
    Representation("third-40ms", "third", 0, 4),
    Representation("third-120ms", "third", 0, 12),  # CENSE-like
    Representation("logmel16-120ms", "mel", 16, 12),
    Representation("logmel32-240ms", "mel", 32, 24),
)
BY_NAME = {r.name: r for r in CANDIDATES}


def power_frames(windows: F32) -> F32:
    """``(B, 98, 257)`` power spectra, exactly as ``fleet_protocol.features`` computes them."""
    x = np.asarray(windows, dtype=np.float32)
    idx = np.arange(F.WIN_LENGTH)[None, :] + F.HOP * np.arange(F.N_FRAMES)[:, None]
    win = np.hanning(F.WIN_LENGTH + 1)[:-1].astype(np.float32)
    spec = np.fft.rfft(x[:, idx] * win, n=F.N_FFT, axis=-1)
    return np.asarray(spec.real**2 + spec.imag**2, dtype=np.float32)


@lru_cache(maxsize=16)
def _filterbank(kind: str, n_bands: int) -> F32:
    if kind == "mel":
        if n_bands == F.N_MELS:
            return F.mel_filterbank()
        n_bins = F.N_FFT // 2 + 1
        freqs = np.linspace(0.0, F.SAMPLE_RATE / 2, n_bins)
        m = np.linspace(
            2595 * np.log10(1 + F.F_MIN / 700), 2595 * np.log10(1 + F.F_MAX / 700), n_bands + 2
        )
        hz = 700 * (10 ** (m / 2595) - 1)
        fb = np.zeros((n_bands, n_bins))
        for i in range(n_bands):
            lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
            fb[i] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        return fb.astype(np.float32)
    if kind == "third":
        n_bins = F.N_FFT // 2 + 1
        freqs = np.linspace(0.0, F.SAMPLE_RATE / 2, n_bins)
        centres = 1000.0 * 2.0 ** (np.arange(-14, 9) / 3.0)  # 63 Hz .. 6.3 kHz
        rows = []
        for fc in centres:
            lo, hi = fc * 2 ** (-1 / 6), fc * 2 ** (1 / 6)
            rows.append(((freqs >= lo) & (freqs < hi)).astype(np.float32))
        fb = np.stack(rows)
        return np.asarray(fb[fb.sum(axis=1) > 0], dtype=np.float32)
    raise ValueError(f"unknown band kind {kind}")
