"""The privacy gate: 1 s audio windows leave the capture path only if no speech is near.

Owns: cutting the stream into windows and 32 ms VAD chunks, the signal conditioning
in front of the VAD (noise-floor subtraction, level normalisation, impulse clipping,
tonal suppression), the twin VAD states, the guard margins around each window and the keep/drop decision. Design and measurements:
docs/adr/0005-privacy-gate.md.

Invariants:
- windows are non-overlapping, ``WINDOW_SAMPLES`` long, aligned to the stream start;
  window ``i`` is samples ``[i*16000, (i+1)*16000)``; VAD chunks are 512 samples,
  also aligned to the stream start;
- a window is dropped if any chunk overlapping its guard interval
  ``[start - margin_before, end + margin_after)`` is *speech* for any detector:
  probability >= ``threshold``, or >= ``threshold - hysteresis`` while that
  detector's previous chunk was speech; a detector whose conditioning delays the
  signal (those with the tonal stage, by 256 samples) also marks the chunk before;
- chunks are conditioned one by one as they arrive and queued; once the queue holds
  ``ENCODE_BATCH`` rows (chunks x detectors) the VAD encoder scores them as one
  batch and its recurrent decoder steps through them in stream order;
- a window is decided only once every detector has scored all of its guard interval;
  at ``flush`` the last chunk is zero-padded and the delayed detectors are drained with
  silence, and a window whose after-margin the stream end cuts is dropped unvetted
  (speech starting in the last ``margin_after_s`` of a file may not be detected yet);
- the detectors only ever see conditioned copies; kept audio is the input unchanged;
- a dropped window's samples are overwritten in the gate's buffer at decision time and
  never returned, logged or stored; only its index is counted (detector state and
  the scoring queue keep at most the last ``ENCODE_BATCH`` chunks' conditioned
  samples, replaced as the stream moves on);
- each detector's chunk is scored by two VAD states whose recurrent state is zeroed in
  turn, every ``vad_reset_s`` and half a period apart, on the stream-aligned chunk
  count; the older of the two decides (ties: the first);
- decisions depend only on the samples, not on how they were split into ``push``
  calls: every stage works chunk by chunk on the stream-aligned grid, and the
  encoder's result for a chunk does not depend on its batch-mates (``silero.encode``);
- a trailing partial window (less than 1 s at ``flush``) is discarded, never kept;
- one ``push`` accepts at most ``config.max_block_samples`` samples (untrusted cap).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import ConfigError
from edge_daemon.privacy.silero import ENCODE_BATCH, HIDDEN
from edge_daemon.privacy.speech_check import SpeechCheck
from edge_daemon.privacy.vad import (
    CHUNK_SAMPLES,
    CONTEXT_SAMPLES,
    SAMPLE_RATE,
    SileroVad,
    context_inputs,
)
from fleet_protocol.features import features_batch

log = logging.getLogger(__name__)

WINDOW_SAMPLES = SAMPLE_RATE
DETECTORS: tuple[str, ...] = ("denoise", "level", "declip", "tonal", "raw")
STATE_SCHEMES: tuple[str, ...] = ("twin", "all")
STFT_SIZE = 512
STFT_HOP = 256
TONAL_HALF_BINS = 8  # +-250 Hz at 31.25 Hz per bin
DENOISE_MEMORY_S = 1.5  # noise floor: the quietest smoothed power over at least this long
DENOISE_BLOCK = 16  # frames (256 ms): the floor's memory is kept as per-block minima
DENOISE_SMOOTHING = 0.7  # per 16 ms frame
DENOISE_GAIN_FLOOR = 0.1  # -20 dB at most

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GateConfig:
    """How cautious the gate is. The defaults meet the targets measured in docs/adr/0005.

    threshold: a 32 ms chunk whose speech probability is at or above this is speech
        (Silero's own default); lower trades yield for less leakage.
    hysteresis: after a speech chunk, the next chunk of the same detector is speech
        while its probability is >= ``threshold - hysteresis`` (bridges dips).
    margin_before_s: guard time before a window's start that must be speech-free
        (covers the VAD letting go early when an utterance fades into noise; Silero
        mostly holds on well past the end, so this can be short).
    margin_after_s: guard time after a window's end that must be speech-free (covers
        the VAD's onset latency, over 1 s for speech that starts quietly in noise).
        Windows are released this much after their end, plus the chunks waiting for
        the next encoder batch (up to ``ENCODE_BATCH``, 256 ms, with one detector).
    detectors: the conditioned copies of the signal that the VAD scores; a chunk is
        speech if any of them says so; each costs one VAD run per chunk (two with
        ``vad_reset_s``). ``"denoise"``: spectral subtraction of a minimum-statistics
        noise floor (``denoise_over`` times it; steady maskers such as traffic, wind
        and engines). ``"level"``: AGC only. ``"declip"``: each chunk clipped at
        ``declip_factor`` times its median absolute sample (impulsive noise such as
        hammering). ``"tonal"``: STFT bins capped at ``tonal_factor`` times their
        local median (horns, sirens). Every detector ends with the AGC. The default,
        denoise alone, leaked nothing in 3.8 h at 0 dB (ADR 0005); the others stay
        for deployments that trade yield for more views.
    declip_factor, tonal_factor, denoise_over: see ``detectors``.
    agc_target_dbfs: each detector's input is amplified so that the loudest chunk of
        the last ``agc_hold_s`` reaches this RMS level (Silero misses quiet speech).
    agc_max_gain_db: the most that amplification may add (it never attenuates).
    agc_hold_s: how far back the level estimate looks.
    vad_reset_s: Silero's recurrent state drifts deaf after long stretches of loud noise
        (whole utterances at 0 dB under construction noise score < 0.15 from every
        detector, yet > 0.9 once the state is fresh). So each detector runs on two
        VAD states, each zeroed every ``vad_reset_s`` and half a period apart, and the
        older of the two decides: never more than ``vad_reset_s`` of history, never
        less than half of it (a fresh state false-alarms for ~2 s). 0 = one state, never
        reset (half the VAD cost).
    vad_states: how the VAD states of a detector decide. ``"twin"``: the older of the
        two restarted states decides. ``"all"``: a third state that is never reset (only
        at stream start) joins them, and a chunk is speech for the detector if any of
        the three says so, each restarted state only once it is ``min_state_age_s``
        old (a fresh state false-alarms; one state alone can go deaf for seconds, or
        wake up late on a short word after seconds without speech: ADR 0005).
    min_state_age_s: see ``vad_states``.
    speech_check: a window the VAD passes must also pass the second detector
        (``speech_check.SpeechCheck``: a small model on the window's upload features);
        the features it computed travel with the ``KeptWindow``.
    speech_check_threshold: its threshold (None: the model card's).
    max_block_samples: the largest block one ``push`` accepts.
    """

    threshold: float = 0.5
    hysteresis: float = 0.1
    margin_before_s: float = 0.25
    margin_after_s: float = 0.75
    detectors: tuple[str, ...] = ("denoise", "raw")
    declip_factor: float = 3.0
    tonal_factor: float = 3.0
    denoise_over: float = 2.0
    vad_reset_s: float = 10.0
    vad_states: str = "all"
    min_state_age_s: float = 5.0
    speech_check: bool = True
    speech_check_threshold: float | None = None
    agc_target_dbfs: float = -20.0
    agc_max_gain_db: float = 40.0
    agc_hold_s: float = 0.5
    max_block_samples: int = 60 * SAMPLE_RATE

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"privacy.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.hysteresis < self.threshold:
            raise ConfigError(
                f"privacy.hysteresis must be in [0, threshold), got {self.hysteresis}"
            )
        if self.vad_reset_s and not 1.0 <= self.vad_reset_s <= 600.0:
            raise ConfigError(
                f"privacy.vad_reset_s must be 0 or in [1, 600], got {self.vad_reset_s}"
            )
        for name in ("margin_before_s", "margin_after_s", "agc_hold_s"):
            v = getattr(self, name)
            if not 0.0 <= v <= 10.0:
                raise ConfigError(f"privacy.{name} must be in [0, 10] s, got {v}")
        if not self.detectors or set(self.detectors) - set(DETECTORS):
            raise ConfigError(f"privacy.detectors must be a non-empty subset of {DETECTORS}")
        if self.vad_states not in STATE_SCHEMES:
            raise ConfigError(f"privacy.vad_states must be one of {STATE_SCHEMES}")
        if self.vad_reset_s and not 0.0 <= self.min_state_age_s <= 0.5 * self.vad_reset_s:
            raise ConfigError("privacy.min_state_age_s must be in [0, vad_reset_s / 2]")
        if self.speech_check_threshold is not None and not 0 < self.speech_check_threshold < 1:
            raise ConfigError("privacy.speech_check_threshold must be in (0, 1)")
        if len(set(self.detectors)) != len(self.detectors):
            raise ConfigError("privacy.detectors lists a detector twice")
        for name in ("declip_factor", "tonal_factor"):
            if not getattr(self, name) >= 1.0:
                raise ConfigError(f"privacy.{name} must be >= 1, got {getattr(self, name)}")
        if not -60.0 <= self.agc_target_dbfs <= 0.0:
            raise ConfigError(
                f"privacy.agc_target_dbfs must be in [-60, 0], got {self.agc_target_dbfs}"
            )
        if not 0.0 <= self.agc_max_gain_db <= 80.0:
            raise ConfigError(
                f"privacy.agc_max_gain_db must be in [0, 80], got {self.agc_max_gain_db}"
            )
        if self.max_block_samples < 1:
            raise ConfigError("privacy.max_block_samples must be positive")


@dataclass(frozen=True)
class KeptWindow:
    """A speech-free 1 s window: its index in the stream and its samples (a copy);
    ``features``: its upload features when the speech check computed them."""

    index: int
    start_sample: int
    audio: FloatArray
    features: FloatArray | None = None


@dataclass
class GateStats:
    """Counters since construction (not reset by ``flush``)."""

    windows_in: int = 0
    windows_kept: int = 0
    windows_dropped_speech: int = 0
    windows_dropped_unvetted: int = 0  # at flush: the stream ended inside the after-margin
    windows_dropped_check: int = 0  # passed the VAD, flagged by the speech check
    vad_cpu_s: float = 0.0  # process CPU seconds inside the VAD (encoder + LSTM steps)
    check_cpu_s: float = 0.0  # process CPU seconds inside the speech check (features + model)
    condition_cpu_s: float = 0.0  # process CPU seconds conditioning chunks for the VAD views


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


class _Detector:
    """One conditioned copy of the signal -> AGC -> (VAD, batched by the gate) -> hysteresis.

    Works on consecutive chunks; every stage gives the same result for any grouping of
    chunks into calls, so the output cannot depend on block sizes.
    """

    def __init__(self, config: GateConfig, kind: str) -> None:
        self.kind = kind
        self._stages: list[_Declip | _Stft] = []
        if kind == "declip":
            self._stages.append(_Declip(config.declip_factor))
        elif kind == "tonal":
            self._stages.append(_Detonal(config.tonal_factor))
        elif kind == "denoise":
            self._stages.append(_Denoise(config.denoise_over))
        self.delay = sum(stage.delay for stage in self._stages)
        self._target = 10.0 ** (config.agc_target_dbfs / 20.0)
        self._max_gain = 10.0 ** (config.agc_max_gain_db / 20.0)
        self._hold = max(1, round(config.agc_hold_s * SAMPLE_RATE / CHUNK_SAMPLES))
        self._on = config.threshold
        self._off = config.threshold - config.hysteresis
        self.reset()

    def reset(self) -> None:
        for stage in self._stages:
            stage.reset()
        self._levels: deque[float] = deque(maxlen=self._hold)
        self._prev = False

    def prepare(self, chunks: FloatArray) -> FloatArray:
        """The VAD inputs ``(m, CHUNK_SAMPLES)`` for ``m`` consecutive chunks (stream order)."""
        if self.kind == "raw":  # plain Silero: the signal as captured
            return np.asarray(chunks, dtype=np.float32)
        x = chunks.astype(np.float64)
        for stage in self._stages:
            x = stage(x)
        # AGC: lift the loudest chunk of the last agc_hold_s to the target; never cut.
        levels = np.sqrt(np.einsum("ij,ij->i", x, x) / x.shape[1]) + 1e-9
        gains = np.empty(x.shape[0])
        for i, level in enumerate(levels.tolist()):
            self._levels.append(level)
            gains[i] = min(max(self._target / max(self._levels), 1.0), self._max_gain)
        return np.asarray(x * gains[:, None], dtype=np.float32)

    def decide(self, prob: float) -> bool:
        """Speech or not, given the VAD's probability for the prepared chunk."""
        s = prob >= self._on or (self._prev and prob >= self._off)
        self._prev = s
        return s


def twin_ages(chunk: int, period: int) -> tuple[int, int]:
    """Chunks since twin A and twin B were last zeroed (or since the stream start)."""
    half = period // 2
    return chunk % period, (chunk - half) % period if chunk >= half else chunk


def twin_schedule(chunk: int, period: int) -> tuple[bool, bool, bool]:
    """Before scoring stream chunk ``chunk``: (zero twin A, zero twin B, A decides).

    A restarts at every multiple of ``period`` after the first chunk, B half a period
    later; the twin that restarted longer ago decides (A on a tie, at stream start).
    """
    half = period // 2
    age_a, age_b = twin_ages(chunk, period)
    return chunk > 0 and age_a == 0, chunk >= half and age_b == 0, age_a >= age_b


class PrivacyGate:
    """Streaming gate over one audio stream; ``flush`` ends it and starts the next."""

    def __init__(self, config: GateConfig, vad: SileroVad) -> None:
        self.config = config
        self.stats = GateStats()
        self._detectors = [_Detector(config, kind) for kind in config.detectors]
        k = len(self._detectors)
        self._model = vad.model
        # twin VAD states per detector, restarted in turn every vad_reset_s (see GateConfig)
        self._period = round(config.vad_reset_s * SAMPLE_RATE / CHUNK_SAMPLES)
        self._all = config.vad_states == "all" and self._period > 0
        self._min_age = round(config.min_state_age_s * SAMPLE_RATE / CHUNK_SAMPLES)
        self._states = (3 if self._all else 2) * k if self._period else k
        self._check: SpeechCheck | None = None
        self._check_threshold = config.speech_check_threshold
        if config.speech_check:
            self._check = SpeechCheck()
        # a detector whose conditioning lags by d samples also flags the chunks before
        self._lag = max(-(-d.delay // CHUNK_SAMPLES) for d in self._detectors)
        self._before = round(config.margin_before_s * SAMPLE_RATE)
        self._after = round(config.margin_after_s * SAMPLE_RATE)
        self._start_stream()

    def _start_stream(self) -> None:
        k = len(self._detectors)
        self._context = np.zeros((k, CONTEXT_SAMPLES), dtype=np.float32)
        self._state = np.zeros((2, self._states, HIDDEN), dtype=np.float32)
        self._queue: list[FloatArray] = []  # prepared (k, 512) chunks not yet scored
        for d in self._detectors:
            d.reset()
        self._next_window = 0  # index of the first undecided window
        self._audio = np.zeros(0, dtype=np.float32)  # samples from that window's start
        self._unscored = np.zeros(0, dtype=np.float32)  # tail not yet a whole chunk
        self._speech: list[bool] = []  # per chunk, from chunk index self._chunk_base
        self._chunk_base = 0
        self._total = 0  # samples pushed in this stream
        self._chunks = 0  # chunks scored in this stream

    def push(self, samples: npt.ArrayLike) -> list[KeptWindow]:
        """Feed the next samples (mono float32, 16 kHz); return newly released windows."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"gate wants mono 1-D audio, got shape {x.shape}")
        if x.size > self.config.max_block_samples:
            raise ValueError(f"block of {x.size} samples > cap {self.config.max_block_samples}")
        if not x.size:
            return []
        self._total += int(x.size)
        self._audio = np.concatenate((self._audio, x))
        buf = np.concatenate((self._unscored, x))
        n = buf.size // CHUNK_SAMPLES
        for i in range(0, n, ENCODE_BATCH):
            self._prepare(buf[i * CHUNK_SAMPLES : min(n, i + ENCODE_BATCH) * CHUNK_SAMPLES])
        self._unscored = buf[n * CHUNK_SAMPLES :].copy()
        if len(self._queue) * len(self._detectors) >= ENCODE_BATCH:
            self._score_queue()
        return self._release(final=False)

    def flush(self) -> list[KeptWindow]:
        """End of stream: score the rest (zero-padded, plus silence for the lagging
        detectors to drain), decide every full window, discard the partial one, reset."""
        last = np.zeros(CHUNK_SAMPLES, dtype=np.float32)
        last[: self._unscored.size] = self._unscored
        for _ in range((1 if self._unscored.size else 0) + self._lag):
            self._prepare(last)
            last = np.zeros(CHUNK_SAMPLES, dtype=np.float32)
        self._score_queue()
        kept = self._release(final=True)
        if self._audio.size:
            log.debug("discarding trailing partial window of %d samples", self._audio.size)
            self._audio[:] = 0.0
        self._start_stream()
        return kept

    def _prepare(self, samples: FloatArray) -> None:
        """Condition whole chunks (a multiple of CHUNK_SAMPLES) and queue them for scoring."""
        t0 = time.process_time()
        chunks = samples.reshape(-1, CHUNK_SAMPLES)
        prepared = np.stack([d.prepare(chunks) for d in self._detectors], axis=1)
        self._queue.extend(prepared)  # (k, 512) per chunk
        self.stats.condition_cpu_s += time.process_time() - t0

    def _score_queue(self) -> None:
        """Score the queued chunks: one encoder batch, then the decoder chunk by chunk."""
        if not self._queue:
            return
        chunks = np.stack(self._queue)  # (n, k, 512)
        self._queue.clear()
        n, k = chunks.shape[0], chunks.shape[1]
        inputs = context_inputs(self._context, chunks)
        self._context = np.array(chunks[-1, :, -CONTEXT_SAMPLES:], dtype=np.float32)
        t0 = time.process_time()
        gates = self._model.encode(inputs.reshape(n * k, -1)).reshape(n, k, -1)
        for g in gates:
            self._score(g)
        self.stats.vad_cpu_s += time.process_time() - t0

    def _score(self, gates: FloatArray) -> None:
        k, i = len(self._detectors), self._chunks
        self._chunks += 1
        if not self._period:
            probs, self._state = self._model.step(gates, self._state)
        else:
            restart_a, restart_b, a_decides = twin_schedule(i, self._period)
            if restart_a:
                self._state[:, :k] = 0.0
            if restart_b:
                self._state[:, k : 2 * k] = 0.0
            rows = np.concatenate((gates,) * (3 if self._all else 2))
            every, self._state = self._model.step(rows, self._state)
            if self._all:  # the never-reset state, and each twin once it is old enough
                age_a, age_b = twin_ages(i, self._period)
                probs = every[2 * k :]
                if age_a >= self._min_age:
                    probs = np.maximum(probs, every[:k])
                if age_b >= self._min_age:
                    probs = np.maximum(probs, every[k : 2 * k])
            else:
                probs = every[:k] if a_decides else every[k:]
        self._speech.append(False)
        for d, p in zip(self._detectors, probs.tolist(), strict=True):
            if d.decide(p):
                # the flagged audio reaches back d.delay samples before this chunk
                back = -(-d.delay // CHUNK_SAMPLES)
                for j in range(max(0, len(self._speech) - 1 - back), len(self._speech)):
                    self._speech[j] = True

    def _release(self, *, final: bool) -> list[KeptWindow]:
        kept: list[KeptWindow] = []
        scored_chunks = self._chunk_base + len(self._speech)
        while self._audio.size >= WINDOW_SAMPLES:
            w = self._next_window
            start = w * WINDOW_SAMPLES
            end = start + WINDOW_SAMPLES
            guard_end = min(end + self._after, self._total) if final else end + self._after
            last_chunk = -(-guard_end // CHUNK_SAMPLES) - 1  # last chunk touching the guard
            if last_chunk + self._lag >= scored_chunks:
                break  # after-margin not fully scored yet: wait for more audio
            first_chunk = max(0, (start - self._before) // CHUNK_SAMPLES)
            lo, hi = first_chunk - self._chunk_base, last_chunk - self._chunk_base + 1
            unvetted = end + self._after > self._total  # only at flush: cut by the stream end
            speech = any(self._speech[lo:hi])
            self.stats.windows_in += 1
            if speech or unvetted:
                if unvetted:
                    self.stats.windows_dropped_unvetted += 1
                else:
                    self.stats.windows_dropped_speech += 1
                self._audio[:WINDOW_SAMPLES] = 0.0  # our copy; do not leave it for the GC
                log.debug("window %d dropped: %s", w, "unvetted" if unvetted else "speech")
            else:
                kept.append(KeptWindow(w, start, self._audio[:WINDOW_SAMPLES].copy()))
            self._audio = self._audio[WINDOW_SAMPLES:].copy()
            self._next_window = w + 1
            self._trim_chunks()
        return self._checked(kept)

    def _checked(self, kept: list[KeptWindow]) -> list[KeptWindow]:
        """The second line of defence: the speech check on the windows' upload features."""
        if self._check is None or not kept:
            self.stats.windows_kept += len(kept)
            return kept
        t0 = time.process_time()
        feats = features_batch(np.stack([k.audio for k in kept]))
        passes = self._check.passes(feats, self._check_threshold)
        self.stats.check_cpu_s += time.process_time() - t0
        out: list[KeptWindow] = []
        for k, f, ok in zip(kept, feats, passes.tolist(), strict=True):
            if ok:
                out.append(KeptWindow(k.index, k.start_sample, k.audio, f))
            else:
                k.audio[:] = 0.0
                self.stats.windows_dropped_check += 1
                log.debug("window %d dropped: speech check", k.index)
        self.stats.windows_kept += len(out)
        return out

    def _trim_chunks(self) -> None:
        """Forget chunk flags that no undecided window's guard interval reaches."""
        keep_from = max(0, (self._next_window * WINDOW_SAMPLES - self._before) // CHUNK_SAMPLES)
        drop = keep_from - self._chunk_base
        if drop > 0:
            del self._speech[:drop]
            self._chunk_base = keep_from
