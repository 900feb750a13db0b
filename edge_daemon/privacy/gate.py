"""The privacy gate: 1 s audio windows leave the capture path only if no speech is near.

Owns: cutting the stream into windows and 32 ms VAD chunks, the signal conditioning
in front of the VAD (noise-floor subtraction, level normalisation, impulse clipping,
tonal suppression, late-reverberation subtraction), the restarted and never-reset
VAD states and their vote, the warm-up after each stream start, the guard margins
around each window and the keep/drop decision. The conditioning stages themselves
live in ``edge_daemon.privacy.conditioning``. Design and measurements:
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
- each detector's chunk is scored by several VAD states on the stream-aligned chunk
  count: with ``vad_states="twin"`` two states zeroed in turn every ``vad_reset_s``,
  half a period apart, the older deciding (ties: the first); with ``"all"`` a state
  never reset plus a pair of states per restart period (``vad_reset_s``,
  ``vad_fast_reset_s`` zeroed, ``vad_warm_reset_s`` restarted from ``warm_state``),
  each pair half a period apart; the chunk's probability is the never-reset state's
  or the ``vad_votes``-th highest of the restarted states', whichever is higher;
- windows that start within the first ``warmup_s`` of a stream (after ``flush``: a
  capture restart) are dropped whatever the detectors say (``windows_dropped_warmup``);
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
from edge_daemon.privacy.conditioning import _Declip, _Denoise, _Dereverb, _Detonal, _Stft
from edge_daemon.privacy.silero import ENCODE_BATCH, HIDDEN, SileroModel
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
DETECTORS: tuple[str, ...] = ("denoise", "level", "declip", "tonal", "raw", "dereverb")
STATE_SCHEMES: tuple[str, ...] = ("twin", "all")
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
        local median (horns, sirens). ``"dereverb"``: late-reverberation
        subtraction (``_Dereverb``; speech through a hall; not in the defaults: tried
        on one stream only, ADR 0005 revision 4). ``"raw"``: plain Silero on the
        signal as captured, no AGC. Every other detector ends with the AGC. The default,
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
        two restarted states decides. ``"all"``: a state that is never reset (only at
        stream start) and pairs of restarted states (``vad_reset_s``,
        ``vad_fast_reset_s``, ``vad_warm_reset_s``); a chunk is speech for the
        detector if the never-reset state says so or ``vad_votes`` restarted states
        agree, each restarted state only once it is ``min_state_age_s`` old. One state
        alone can go deaf for seconds, or wake up late on a short word after seconds
        without speech; a fresh state hears it but false-alarms about once every 3 s
        of noise (0.5-1.3 % of chunks), a never-reset one 20 times less; asking
        several restarted states to agree keeps most of what they hear and few of
        their false alarms (ADR 0005, revision 4).
    vad_fast_reset_s: ``"all"``: period of a second pair of zeroed states (0: none).
    vad_warm_reset_s: ``"all"``: period of a pair of states restarted from
        ``warm_state`` (the state after 3 s of quiet noise) instead of zeros (0: none).
    vad_votes: ``"all"``: restarted states that must agree (1: any of them).
    min_state_age_s: see ``vad_states``.
    warmup_s: windows that start this early in a stream are dropped unscored: at
        stream start and after a capture restart every state is fresh and has heard
        nothing before the first word (words 0.1-0.4 s into a stream scored < 0.5 by
        every state; ADR 0005). Costs ``warmup_s`` of audio per restart.
    speech_check: a window the VAD passes must also pass the second detector
        (``speech_check.SpeechCheck``: a small model on the window's upload features);
        the features it computed travel with the ``KeptWindow``.
    speech_check_threshold: its threshold (None: the model card's).
    max_block_samples: the largest block one ``push`` accepts.
    """

    threshold: float = 0.5
    hysteresis: float = 0.1
    margin_before_s: float = 0.5
    margin_after_s: float = 0.75
    detectors: tuple[str, ...] = ("denoise", "raw")
    declip_factor: float = 3.0
    tonal_factor: float = 3.0
    denoise_over: float = 2.0
    vad_reset_s: float = 10.0
    vad_states: str = "all"
    vad_fast_reset_s: float = 4.0
    vad_warm_reset_s: float = 3.0
    vad_votes: int = 3
    min_state_age_s: float = 0.0
    warmup_s: float = 2.0
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
        for name in ("vad_fast_reset_s", "vad_warm_reset_s"):
            v = getattr(self, name)
            if v and not 1.0 <= v <= 600.0:
                raise ConfigError(f"privacy.{name} must be 0 or in [1, 600], got {v}")
        if not 1 <= self.vad_votes <= 6:
            raise ConfigError(f"privacy.vad_votes must be in [1, 6], got {self.vad_votes}")
        shortest = min((p for p in self.restart_periods_s() if p), default=0.0)
        if shortest and not 0.0 <= self.min_state_age_s <= 0.5 * shortest:
            raise ConfigError("privacy.min_state_age_s must be in [0, shortest restart / 2]")
        if not 0.0 <= self.warmup_s <= 60.0:
            raise ConfigError(f"privacy.warmup_s must be in [0, 60] s, got {self.warmup_s}")
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

    def restart_periods_s(self) -> tuple[float, ...]:
        """The restart period of each pair of restarted states (zeroed, zeroed, warm)."""
        if not self.vad_reset_s:
            return ()
        if self.vad_states == "twin":
            return (self.vad_reset_s,)
        return (self.vad_reset_s, self.vad_fast_reset_s, self.vad_warm_reset_s)


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
    windows_dropped_warmup: int = 0  # in the first warmup_s of a stream
    vad_cpu_s: float = 0.0  # process CPU seconds inside the VAD (encoder + LSTM steps)
    check_cpu_s: float = 0.0  # process CPU seconds inside the speech check (features + model)
    condition_cpu_s: float = 0.0  # process CPU seconds conditioning chunks for the VAD views


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
        elif kind == "dereverb":
            self._stages.append(_Dereverb(config.denoise_over))
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


def state_age(chunk: int, period: int, offset: int) -> int:
    """Chunks since a state restarted every ``period`` chunks from chunk ``offset`` on
    (and before that, since the stream start) was last restarted."""
    if chunk < offset:
        return chunk
    return (chunk - offset) % period


WARM_NOISE_S = 3.0
WARM_NOISE_DBFS = -20.0  # the AGC's target: what the detectors' inputs are lifted to


def warm_state(model: SileroModel) -> FloatArray:
    """``(2, 128)``: the decoder state after ``WARM_NOISE_S`` of quiet, smooth noise
    (fixed seed) from zeros: a state that has heard "nothing in particular", so it
    false-alarms less than a zeroed one yet has no history that could make it deaf."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.standard_normal(int(WARM_NOISE_S * SAMPLE_RATE))) * 0.002
    x = x - np.convolve(x, np.ones(64) / 64, mode="same")
    x = x / np.sqrt(np.mean(x * x)) * 10 ** (WARM_NOISE_DBFS / 20)
    n = x.size // CHUNK_SAMPLES
    chunks = x[: n * CHUNK_SAMPLES].astype(np.float32).reshape(n, 1, CHUNK_SAMPLES)
    inputs = context_inputs(np.zeros((1, CONTEXT_SAMPLES), np.float32), chunks)
    gates = model.encode(inputs.reshape(n, -1))
    state = np.zeros((2, 1, HIDDEN), dtype=np.float32)
    for g in gates:
        _, state = model.step(g[None], state)
    return np.asarray(state[:, 0], dtype=np.float32)


class PrivacyGate:
    """Streaming gate over one audio stream; ``flush`` ends it and starts the next."""

    def __init__(self, config: GateConfig, vad: SileroVad) -> None:
        self.config = config
        self.stats = GateStats()
        self._detectors = [_Detector(config, kind) for kind in config.detectors]
        k = len(self._detectors)
        self._model = vad.model
        # restarted VAD states per detector: (period, offset, warm) in chunks (GateConfig)
        per_s = SAMPLE_RATE / CHUNK_SAMPLES
        self._restarts: list[tuple[int, int, bool]] = []
        for j, period_s in enumerate(config.restart_periods_s()):
            period = round(period_s * per_s)
            if period:
                for offset in (0, period // 2):
                    self._restarts.append((period, offset, j == 2))
        self._period = self._restarts[0][0] if self._restarts else 0
        self._all = config.vad_states == "all" and self._period > 0
        self._votes = min(config.vad_votes, len(self._restarts)) if self._all else 1
        self._min_age = round(config.min_state_age_s * per_s)
        self._warm = warm_state(self._model) if any(w for *_, w in self._restarts) else None
        # rows of the state array: restarted states in order, then the never-reset one
        self._states = (len(self._restarts) + (1 if self._all else 0)) * k if self._period else k
        self._warmup = round(config.warmup_s * SAMPLE_RATE)
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
            ages = [state_age(i, period, offset) for period, offset, _ in self._restarts]
            for j, ((_, _, warm), age) in enumerate(zip(self._restarts, ages, strict=True)):
                if i > 0 and age == 0:
                    rows_j = self._state[:, j * k : (j + 1) * k]
                    rows_j[:] = self._warm[:, None] if warm and self._warm is not None else 0.0
            n_states = self._states // k
            every, self._state = self._model.step(np.concatenate((gates,) * n_states), self._state)
            every = every.reshape(n_states, k)
            if self._all:  # the never-reset state, or enough restarted ones old enough
                fresh = every[: len(self._restarts)].copy()
                fresh[np.asarray(ages) < self._min_age] = 0.0
                fresh.sort(axis=0)
                probs = np.maximum(every[-1], fresh[-self._votes])
            else:
                probs = every[0] if ages[0] >= ages[1] else every[1]
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
            warming = start < self._warmup
            speech = any(self._speech[lo:hi])
            self.stats.windows_in += 1
            if speech or unvetted or warming:
                if warming:
                    why = "warm-up"
                    self.stats.windows_dropped_warmup += 1
                elif unvetted:
                    why = "unvetted"
                    self.stats.windows_dropped_unvetted += 1
                else:
                    why = "speech"
                    self.stats.windows_dropped_speech += 1
                self._audio[:WINDOW_SAMPLES] = 0.0  # our copy; do not leave it for the GC
                log.debug("window %d dropped: %s", w, why)
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
