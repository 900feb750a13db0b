"""LAeq,1s: the A-weighted equivalent continuous sound level of each second of audio.

Owns the A-weighting and the level arithmetic; numpy only, no I/O.

Method: frequency-domain weighting. Each 1 s block (16 000 samples, 1 Hz bins) is
transformed with a real FFT; its one-sided power spectrum is weighted by |A(f)|^2 from
the analogue A-weighting of IEC 61672-1 (poles 20.6, 107.7, 737.9, 12194 Hz,
normalised to 0 dB at 1 kHz) and summed (Parseval), giving the A-weighted mean square.
This is exact for the IEC 61672 response at every bin (a bilinear-transformed IIR
filter is not: it sags by ~0.5 dB near 8 kHz and more towards 8 kHz at fs = 16 kHz),
costs one FFT per second, and keeps no filter state across seconds.

Levels: ``dBFS`` follows AES17 (a full-scale sine reads 0 dBFS, so a sine of amplitude
``a`` reads ``20 log10 a``); ``dB(A) SPL = dBFS + calibration_db``, where
``calibration_db`` is the SPL that reads 0 dBFS (a MEMS microphone of sensitivity
-26 dBFS at 94 dB SPL gives 120). Digital silence reads ``FLOOR_DBFS``.

Accuracy (tests/unit/test_laeq.py): a 1 kHz sine reads its level within 0.01 dB; 100 Hz
reads 19.1 dB below unweighted (IEC 61672: -19.1). 10 kHz cannot exist in a 16 kHz
stream (Nyquist is 8 kHz); at 48 kHz the same code reads it 2.5 dB below unweighted
(IEC: -2.5). So on the device, energy above 8 kHz is missing from the level (the
capture chain's anti-alias filter removes it); for city noise this is a small
understatement, worth knowing when comparing with a class 1 meter. A tone that is not
on a 1 Hz bin leaks into neighbouring bins (a rectangular 1 s block keeps every sample's
energy, as LAeq must): where A(f) is steep such a tone reads high, up to ~1 dB at 50 Hz
and ~0.1 dB at 100 Hz; from 200 Hz up, < 0.01 dB. Broadband noise is not affected.
Invariant: only levels leave this module, never audio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt

from fleet_protocol.features import SAMPLE_RATE

FLOOR_DBFS = -140.0
AES17_DB = 10 * math.log10(2.0)  # full-scale sine: mean square 0.5 → 0 dBFS
_F1, _F2, _F3, _F4 = 20.598997, 107.65265, 737.86223, 12194.217
_A1000_DB = 1.9997  # IEC 61672 normalisation constant: A(1 kHz) = 0 dB


def a_weighting_db(f: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A(f) in dB per IEC 61672-1 (Annex E); -inf at 0 Hz."""
    f2 = np.asarray(f, dtype=np.float64) ** 2
    with np.errstate(divide="ignore"):
        ra = (_F4**2 * f2**2) / (
            (f2 + _F1**2) * np.sqrt((f2 + _F2**2) * (f2 + _F3**2)) * (f2 + _F4**2)
        )
        return np.asarray(20 * np.log10(ra) + _A1000_DB, dtype=np.float64)


def _power_weights(n: int, rate: int = SAMPLE_RATE) -> npt.NDArray[np.float64]:
    w = 10 ** (a_weighting_db(np.fft.rfftfreq(n, 1 / rate)) / 10)
    w[0] = 0.0
    return np.asarray(w, dtype=np.float64)


_WEIGHTS = _power_weights(SAMPLE_RATE)


def mean_square(
    x: npt.NDArray[np.float32], weighted: bool = True, rate: int = SAMPLE_RATE
) -> float:
    """(A-weighted) mean square of a block, via Parseval on its one-sided spectrum."""
    n = len(x)
    if n == 0:
        return 0.0
    spec = np.fft.rfft(x.astype(np.float64))
    p = np.abs(spec) ** 2 / n**2
    p[1 : (n + 1) // 2] *= 2  # one-sided: every bin but DC (and Nyquist for even n) twice
    if not weighted:
        return float(p.sum())
    w = _WEIGHTS if (n, rate) == (SAMPLE_RATE, SAMPLE_RATE) else _power_weights(n, rate)
    return float((p * w).sum())


def dbfs(ms: float) -> float:
    """AES17 dBFS of a mean square."""
    return FLOOR_DBFS if ms <= 0 else max(FLOOR_DBFS, 10 * math.log10(ms) + AES17_DB)


def laeq_dbfs(x: npt.NDArray[np.float32], rate: int = SAMPLE_RATE) -> float:
    return dbfs(mean_square(x, weighted=True, rate=rate))


class LaeqMeter:
    """Cuts a stream into 1 s blocks and gives the LAeq (dB SPL, calibrated) of each."""

    def __init__(self, calibration_db: float) -> None:
        self.calibration_db = calibration_db
        self._pending: list[npt.NDArray[np.float32]] = []
        self._n = 0

    def push(self, block: npt.NDArray[np.float32]) -> list[float]:
        out: list[float] = []
        while len(block):
            take = min(len(block), SAMPLE_RATE - self._n)
            self._pending.append(block[:take])
            self._n += take
            block = block[take:]
            if self._n == SAMPLE_RATE:
                second = np.concatenate(self._pending)
                self._pending, self._n = [], 0
                out.append(round(laeq_dbfs(second) + self.calibration_db, 2))
        return out


def tap(
    blocks: Iterable[npt.NDArray[np.float32]],
    meter: LaeqMeter,
    on_level: Callable[[float], None],
) -> Iterator[npt.NDArray[np.float32]]:
    """Pass blocks through unchanged, reporting each completed second's LAeq."""
    for b in blocks:
        for level in meter.push(b):
            on_level(level)
        yield b
