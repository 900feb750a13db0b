"""The privacy gate: 1 s audio windows leave the capture path only if no speech is near.

Owns: cutting the stream into windows and 32 ms VAD chunks, the signal conditioning
in front of the VAD (level normalisation, impulse clipping), the guard margins around
each window and the keep/drop decision. Design and measurements: docs/adr/0005.

Invariants:
- windows are non-overlapping, ``WINDOW_SAMPLES`` long, aligned to the stream start;
  window ``i`` is samples ``[i*16000, (i+1)*16000)``; VAD chunks are 512 samples,
  also aligned to the stream start;
- a window is decided only once every chunk overlapping its guard interval
  ``[start - margin_before, end + margin_after)`` has been scored (at ``flush`` the
  interval is cut at the stream end, after the zero-padded last chunk is scored);
- a window is dropped if any of those chunks is *speech* for any detector:
  probability >= ``threshold``, or >= ``threshold - hysteresis`` while that
  detector's previous chunk was speech;
- the detectors only ever see conditioned copies; the conditioning never reaches the
  kept audio, which is the input samples unchanged;
- a dropped window's samples are overwritten in the gate's buffer at decision time and
  never returned, logged or stored; only its index is counted;
- decisions depend only on the samples, not on how they were split into ``push`` calls;
- a trailing partial window (less than 1 s at ``flush``) is discarded, never kept;
- one ``push`` accepts at most ``config.max_block_samples`` samples (untrusted cap).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import ConfigError
from edge_daemon.privacy.vad import CHUNK_SAMPLES, SAMPLE_RATE, SileroVad

log = logging.getLogger(__name__)

WINDOW_SAMPLES = SAMPLE_RATE
DETECTORS: tuple[str, ...] = ("level", "declip", "highpass")
HIGHPASS_TAPS = 129

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GateConfig:
    """How cautious the gate is. The defaults meet the targets measured in docs/adr/0005.

    threshold: a 32 ms chunk whose speech probability is at or above this is speech.
        Silero's own default is 0.5; lower trades yield for less leakage.
    hysteresis: after a speech chunk, the next chunk of the same detector is speech
        while its probability is >= ``threshold - hysteresis`` (bridges dips).
    margin_before_s: guard time before a window's start that must be speech-free
        (covers the VAD letting go before the quiet tail of an utterance ends).
    margin_after_s: guard time after a window's end that must be speech-free (covers
        the VAD's onset latency, which reaches ~1 s for speech that starts quietly in
        noise). Windows are released this much after their end, plus up to one chunk.
    agc_target_dbfs: the detectors' input is amplified so that the loudest chunk of
        the last ``agc_hold_s`` reaches this RMS level (Silero misses quiet speech).
    agc_max_gain_db: the most that amplification may add (it never attenuates).
    agc_hold_s: how far back the level estimate looks.
    detectors: which conditioned copies of the signal the VAD scores; a chunk is speech
        if any of them says so. Each costs one VAD run per chunk. ``"level"``: AGC
        only. ``"declip"``: each chunk clipped at ``declip_factor`` times its median
        absolute sample, then AGC; flattens impulsive noise (hammering) that masks
        speech. ``"highpass"``: FIR high-pass at ``highpass_hz``, then AGC; removes
        the low-frequency rumble (wind, engines) that masks speech.
    declip_factor: see ``detectors``.
    highpass_hz: see ``detectors``.
    max_block_samples: the largest block one ``push`` accepts.
    """

    threshold: float = 0.2
    hysteresis: float = 0.1
    margin_before_s: float = 1.0
    margin_after_s: float = 1.0
    agc_target_dbfs: float = -20.0
    agc_max_gain_db: float = 40.0
    agc_hold_s: float = 0.5
    declip_factor: float = 3.0
    highpass_hz: float = 300.0
    detectors: tuple[str, ...] = DETECTORS
    max_block_samples: int = 60 * SAMPLE_RATE

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"privacy.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.hysteresis < self.threshold:
            raise ConfigError(
                f"privacy.hysteresis must be in [0, threshold), got {self.hysteresis}"
            )
        for name in ("margin_before_s", "margin_after_s", "agc_hold_s"):
            v = getattr(self, name)
            if not 0.0 <= v <= 10.0:
                raise ConfigError(f"privacy.{name} must be in [0, 10] s, got {v}")
        if not -60.0 <= self.agc_target_dbfs <= 0.0:
            raise ConfigError(
                f"privacy.agc_target_dbfs must be in [-60, 0], got {self.agc_target_dbfs}"
            )
        if not 0.0 <= self.agc_max_gain_db <= 80.0:
            raise ConfigError(
                f"privacy.agc_max_gain_db must be in [0, 80], got {self.agc_max_gain_db}"
            )
        if not self.detectors or set(self.detectors) - set(DETECTORS):
            raise ConfigError(f"privacy.detectors must be a non-empty subset of {DETECTORS}")
        if len(set(self.detectors)) != len(self.detectors):
            raise ConfigError("privacy.detectors lists a detector twice")
        if not 50.0 <= self.highpass_hz <= 2000.0:
            raise ConfigError(f"privacy.highpass_hz must be in [50, 2000], got {self.highpass_hz}")
        if not self.declip_factor > 0.0:
            raise ConfigError(f"privacy.declip_factor must be positive, got {self.declip_factor}")
        if self.max_block_samples < 1:
            raise ConfigError("privacy.max_block_samples must be positive")


@dataclass(frozen=True)
class KeptWindow:
    """A speech-free 1 s window: its index in the stream and its samples (a copy)."""

    index: int
    start_sample: int
    audio: FloatArray


@dataclass
class GateStats:
    """Counters since construction (not reset by ``flush``)."""

    windows_in: int = 0
    windows_kept: int = 0
    windows_dropped_speech: int = 0


def highpass_taps(cutoff_hz: float, taps: int = HIGHPASS_TAPS) -> npt.NDArray[np.float64]:
    """Linear-phase FIR high-pass (Hamming-windowed sinc, spectral inversion)."""
    n = np.arange(taps) - (taps - 1) / 2
    lowpass = np.sinc(2.0 * cutoff_hz / SAMPLE_RATE * n) * np.hamming(taps)
    lowpass /= lowpass.sum()
    h = -lowpass
    h[(taps - 1) // 2] += 1.0
    return np.asarray(h, dtype=np.float64)


class _Detector:
    """Conditioning (``kind``), then AGC, then one VAD stream with hysteresis.

    Works one chunk at a time so that its output cannot depend on block sizes.
    """

    def __init__(self, vad: SileroVad, config: GateConfig, kind: str) -> None:
        self.kind = kind
        self._vad = vad
        self._factor = config.declip_factor
        self._taps = highpass_taps(config.highpass_hz) if kind == "highpass" else None
        self._target = 10.0 ** (config.agc_target_dbfs / 20.0)
        self._max_gain = 10.0 ** (config.agc_max_gain_db / 20.0)
        self._hold = max(1, int(round(config.agc_hold_s * SAMPLE_RATE / CHUNK_SAMPLES)))
        self._on = config.threshold
        self._off = config.threshold - config.hysteresis
        self.reset()

    def reset(self) -> None:
        self._vad.reset()
        self._levels: deque[float] = deque(maxlen=self._hold)
        self._fir_hist = np.zeros(HIGHPASS_TAPS - 1, dtype=np.float64)
        self._prev = False

    def _condition(self, chunk: FloatArray) -> FloatArray:
        x = chunk.astype(np.float64)
        if self.kind == "declip":
            lim = self._factor * float(np.median(np.abs(x)))
            x = np.clip(x, -lim, lim)
        elif self._taps is not None:
            ext = np.concatenate((self._fir_hist, x))
            self._fir_hist = ext[-(HIGHPASS_TAPS - 1) :]
            x = np.convolve(ext, self._taps, mode="valid")
        self._levels.append(float(np.sqrt(np.mean(x * x))) + 1e-9)
        gain = min(max(self._target / max(self._levels), 1.0), self._max_gain)
        return (x * gain).astype(np.float32)

    def speech(self, chunks: FloatArray) -> list[bool]:
        """Speech flags for ``chunks`` of shape (n, CHUNK_SAMPLES), in stream order."""
        flags: list[bool] = []
        for chunk in chunks:
            p = float(self._vad.chunk_probs(self._condition(chunk))[0])
            s = p >= self._on or (self._prev and p >= self._off)
            flags.append(s)
            self._prev = s
        return flags


class PrivacyGate:
    """Streaming gate over one audio stream; ``flush`` ends it and starts the next."""

    def __init__(self, config: GateConfig, vad: SileroVad) -> None:
        self.config = config
        self.stats = GateStats()
        self._detectors = [
            _Detector(vad if i == 0 else vad.spawn(), config, kind)
            for i, kind in enumerate(config.detectors)
        ]
        self._before = round(config.margin_before_s * SAMPLE_RATE)
        self._after = round(config.margin_after_s * SAMPLE_RATE)
        self._start_stream()

    def _start_stream(self) -> None:
        for d in self._detectors:
            d.reset()
        self._next_window = 0  # index of the first undecided window
        self._audio = np.zeros(0, dtype=np.float32)  # samples from that window's start
        self._unscored = np.zeros(0, dtype=np.float32)  # tail not yet a whole chunk
        self._speech: list[bool] = []  # per chunk, from chunk index self._chunk_base
        self._chunk_base = 0
        self._total = 0  # samples pushed in this stream

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
        self._score(buf[: n * CHUNK_SAMPLES].reshape(n, CHUNK_SAMPLES))
        self._unscored = buf[n * CHUNK_SAMPLES :].copy()
        return self._release(final=False)

    def flush(self) -> list[KeptWindow]:
        """End of stream: score the zero-padded last chunk, decide every full window, reset."""
        if self._unscored.size:
            last = np.zeros((1, CHUNK_SAMPLES), dtype=np.float32)
            last[0, : self._unscored.size] = self._unscored
            self._score(last)
        kept = self._release(final=True)
        if self._audio.size:
            log.debug("discarding trailing partial window of %d samples", self._audio.size)
            self._audio[:] = 0.0
        self._start_stream()
        return kept

    def _score(self, chunks: FloatArray) -> None:
        if not chunks.shape[0]:
            return
        flags = [d.speech(chunks) for d in self._detectors]
        self._speech.extend(any(f) for f in zip(*flags, strict=True))

    def _release(self, *, final: bool) -> list[KeptWindow]:
        kept: list[KeptWindow] = []
        scored_chunks = self._chunk_base + len(self._speech)
        while self._audio.size >= WINDOW_SAMPLES:
            w = self._next_window
            start = w * WINDOW_SAMPLES
            end = start + WINDOW_SAMPLES
            guard_end = min(end + self._after, self._total) if final else end + self._after
            last_chunk = -(-guard_end // CHUNK_SAMPLES) - 1  # last chunk touching the guard
            if last_chunk >= scored_chunks:
                break  # after-margin not scored yet: wait for more audio
            first_chunk = max(0, (start - self._before) // CHUNK_SAMPLES)
            lo, hi = first_chunk - self._chunk_base, last_chunk - self._chunk_base + 1
            speech = any(self._speech[lo:hi])
            self.stats.windows_in += 1
            if speech:
                self.stats.windows_dropped_speech += 1
                self._audio[:WINDOW_SAMPLES] = 0.0  # our copy; do not leave it for the GC
                log.debug("window %d dropped: speech within guard margins", w)
            else:
                self.stats.windows_kept += 1
                kept.append(KeptWindow(w, start, self._audio[:WINDOW_SAMPLES].copy()))
            self._audio = self._audio[WINDOW_SAMPLES:].copy()
            self._next_window = w + 1
            self._trim_chunks()
        return kept

    def _trim_chunks(self) -> None:
        """Forget chunk flags that no undecided window's guard interval reaches."""
        keep_from = max(0, (self._next_window * WINDOW_SAMPLES - self._before) // CHUNK_SAMPLES)
        drop = keep_from - self._chunk_base
        if drop > 0:
            del self._speech[:drop]
            self._chunk_base = keep_from
