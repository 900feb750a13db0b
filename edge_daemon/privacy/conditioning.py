"""Signal conditioning in front of the privacy gate's VAD: each stage turns consecutive
512-sample chunks into conditioned chunks for one detector view.

Owns: impulse clipping (``_Declip``), the streaming STFT with a per-bin gain
(``_Stft``) and its gains: tonal suppression (``_Detonal``), minimum-statistics noise
subtraction (``_Denoise``), late-reverberation subtraction (``_Dereverb``). Used by
``edge_daemon.privacy.gate`` (design: docs/adr/0005-privacy-gate.md).

Invariants:
- every stage gives the same output for any grouping of chunks into calls (its state
  is per stream, reset by ``reset``), so the gate's decisions cannot depend on block
  sizes;
- the STFT stages lag their input by ``delay`` = 256 samples; ``_Declip`` by none;
- gains are in ``[0, 1]``: a stage only attenuates; conditioned audio only ever feeds
  the detectors, never what the gate releases.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from edge_daemon.privacy.vad import CHUNK_SAMPLES, SAMPLE_RATE

STFT_SIZE = 512
STFT_HOP = 256
TONAL_HALF_BINS = 8  # +-250 Hz at 31.25 Hz per bin
DENOISE_MEMORY_S = 1.5  # noise floor: the quietest smoothed power over at least this long
DENOISE_BLOCK = 16  # frames (256 ms): the floor's memory is kept as per-block minima
DENOISE_SMOOTHING = 0.7  # per 16 ms frame
DENOISE_GAIN_FLOOR = 0.1  # -20 dB at most
DEREVERB_RT60_S = 1.0  # assumed decay: longer than most halls, so it over-subtracts
DEREVERB_LATE_S = 0.1  # reverberation later than this after the direct sound is "late"


class _Declip:
    """Clip each chunk at ``factor`` times its median absolute sample (impulses)."""

    delay = 0

    def __init__(self, factor: float) -> None:
        self._factor = factor

    def reset(self) -> None:
        pass

    def __call__(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``x``: ``(m, CHUNK_SAMPLES)`` consecutive chunks."""
        a = np.abs(x)
        mid = a.shape[1] // 2  # the median, as np.median computes it, without its overhead
        part = np.partition(a, (mid - 1, mid), axis=1)[:, mid - 1 : mid + 1]
        lim = self._factor * (part[:, :1] + part[:, 1:]) / 2.0
        return np.clip(x, -lim, lim)


class _Stft:
    """Streaming STFT (512/256, sqrt-Hann, exact overlap-add) with a per-bin gain in
    ``[0, 1]`` chosen by ``_gain``; the output lags the input by ``delay`` = 256 samples."""

    delay = STFT_HOP

    def __init__(self) -> None:
        self._win = np.sqrt(np.hanning(STFT_SIZE + 1)[:STFT_SIZE])
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(STFT_SIZE - STFT_HOP, dtype=np.float64)
        self._tail = np.zeros(STFT_SIZE - STFT_HOP, dtype=np.float64)

    def _gain(self, mag: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        raise NotImplementedError

    def __call__(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``x``: ``(m, CHUNK_SAMPLES)`` consecutive chunks -> the same, conditioned.

        Frames ``2c`` and ``2c + 1`` of the stream belong to chunk ``c``; all frames of the
        call are transformed together (each row on its own, so the result is the same
        for any grouping of chunks into calls)."""
        m = x.shape[0]
        buf = np.concatenate((self._hist, x.reshape(-1)))
        idx = np.arange(STFT_SIZE)[None, :] + STFT_HOP * np.arange(2 * m)[:, None]
        spec = np.fft.rfft(buf[idx] * self._win, axis=1)
        y = np.fft.irfft(spec * self._gain(np.abs(spec)), n=STFT_SIZE, axis=1) * self._win
        out = np.zeros((2 * m + 1) * STFT_HOP, dtype=np.float64)
        out[:STFT_HOP] = self._tail
        halves = y.reshape(2 * m, 2, STFT_HOP)
        out[: 2 * m * STFT_HOP] += halves[:, 0].reshape(-1)
        out[STFT_HOP:] += halves[:, 1].reshape(-1)
        self._tail = out[m * CHUNK_SAMPLES :].copy()
        self._hist = buf[m * CHUNK_SAMPLES :].copy()
        return out[: m * CHUNK_SAMPLES].reshape(m, CHUNK_SAMPLES)


class _Detonal(_Stft):
    """Caps every STFT bin at ``factor`` times the median magnitude of the bins within
    +-``TONAL_HALF_BINS``.

    Narrow tonal maskers (horns, sirens, whistles) stand far above their neighbours
    and are cut by tens of dB; speech harmonics stand much less above them.
    """

    def __init__(self, factor: float) -> None:
        self._factor = factor
        bins, k = STFT_SIZE // 2 + 1, TONAL_HALF_BINS
        self._around = np.clip(np.arange(bins)[:, None] + np.arange(-k, k + 1), 0, bins - 1)
        super().__init__()

    def _gain(self, mag: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        neighbours = mag[:, self._around]  # (frames, bins, 2k+1), edge bins repeated
        neighbours.partition(TONAL_HALF_BINS, axis=2)
        local = neighbours[:, :, TONAL_HALF_BINS]  # median of the 2k+1 bins
        return np.minimum(1.0, (self._factor * local + 1e-12) / np.maximum(mag, 1e-12))


class _Denoise(_Stft):
    """Spectral subtraction of a minimum-statistics noise floor.

    Per bin, the power is smoothed over frames; the noise floor is the minimum of the
    smoothed power over the current block of ``DENOISE_BLOCK`` frames (on the stream's
    frame grid) and the whole blocks before it that cover ``DENOISE_MEMORY_S`` (so
    1.5-1.8 s; a block minimum costs one comparison per frame); the gain is
    ``1 - over * floor / power``, held at or above ``DENOISE_GAIN_FLOOR``. Steady
    maskers (traffic, wind, engines, ventilation) drop by up to 20 dB while speech,
    which comes and goes within that memory, keeps its peaks.
    """

    def __init__(self, over: float) -> None:
        self._over = over
        self._blocks = -(-(round(DENOISE_MEMORY_S * SAMPLE_RATE / STFT_HOP) - 1) // DENOISE_BLOCK)
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._smooth: npt.NDArray[np.float64] | None = None
        self._done: deque[npt.NDArray[np.float64]] = deque(maxlen=self._blocks)
        self._done_min = np.full(STFT_SIZE // 2 + 1, np.inf)
        self._block_min = np.full(STFT_SIZE // 2 + 1, np.inf)
        self._in_block = 0  # frames of the current block seen so far

    def _gain(self, mag: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        power = mag * mag
        floor = np.empty_like(power)
        a = DENOISE_SMOOTHING
        for i, p in enumerate(power):
            self._smooth = p if self._smooth is None else a * self._smooth + (1 - a) * p
            self._block_min = np.minimum(self._block_min, self._smooth)
            floor[i] = np.minimum(self._block_min, self._done_min)
            self._in_block += 1
            if self._in_block == DENOISE_BLOCK:  # blocks lie on the stream's frame grid
                self._done.append(self._block_min)
                self._done_min = np.min(np.stack(self._done), axis=0)
                self._block_min = np.full_like(self._block_min, np.inf)
                self._in_block = 0
        g = 1.0 - self._over * floor / np.maximum(power, 1e-20)
        return np.asarray(np.sqrt(np.clip(g, DENOISE_GAIN_FLOOR**2, 1.0)), dtype=np.float64)


class _Dereverb(_Stft):
    """Late-reverberation subtraction (Lebart et al. 2001): the late reverberant power
    of a bin is the smoothed power ``DEREVERB_LATE_S`` earlier, decayed as a room of
    ``DEREVERB_RT60_S`` decays it; the gain is ``1 - over * late / power``, held at or
    above ``DENOISE_GAIN_FLOOR``. Silero hears speech through a hall far worse than
    dry speech (ADR 0005, revision 4); the subtraction gives it back part of the onsets."""

    def __init__(self, over: float) -> None:
        self._over = over
        self._lag = max(1, round(DEREVERB_LATE_S * SAMPLE_RATE / STFT_HOP))
        self._decay = float(np.exp(-2 * 3 * np.log(10) / DEREVERB_RT60_S * DEREVERB_LATE_S))
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._smooth = np.zeros(STFT_SIZE // 2 + 1)
        self._past: deque[npt.NDArray[np.float64]] = deque(
            [np.zeros(STFT_SIZE // 2 + 1)] * self._lag, maxlen=self._lag
        )

    def _gain(self, mag: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        power = mag * mag
        late = np.empty_like(power)
        for i, p in enumerate(power):
            late[i] = self._decay * self._past[0]
            self._smooth = 0.5 * self._smooth + 0.5 * p
            self._past.append(self._smooth)
        g = 1.0 - self._over * late / np.maximum(power, 1e-20)
        return np.asarray(np.sqrt(np.clip(g, DENOISE_GAIN_FLOOR**2, 1.0)), dtype=np.float64)
