"""Labelled city scene streams with speech mixed in at known times and SNRs.

Owns: the layout of a scene (event segments on the 1 s grid over a background bed),
the placement and level of espeak-ng speech utterances, and the ground truth that the
privacy gate and the classifier are measured against.

Invariants:
- ``render_scene(spec)`` is a pure function of ``spec`` (and the espeak-ng version):
  one ``numpy`` generator seeded with ``spec.seed`` drives every draw, in a fixed
  order, and the speech cache never changes which draws are made;
- events are 1-4 s segments of one class aligned to the 1 s grid;
  ``window_labels[i]`` is the event under samples ``[i*16000, (i+1)*16000)``;
- speech utterances never overlap each other, are not grid aligned, and their level
  is ``snr_db`` (uniform in ``spec.speech_snr_db``) above the RMS of the scene under
  them (active speech level vs. scene RMS, the scene floored at -50 dBFS);
- ``audio`` is the scene plus ``speech_track`` (up to float32 rounding); if the sum
  would clip, both are scaled by the same factor (SNR kept), so peak(audio) <= 0.99;
- ``speech_frames[k]`` is True when the clean speech track in 10 ms frame ``k``
  (samples ``[160k, 160(k+1))``) has RMS above -45 dB relative to the loudest frame
  of that utterance. This is conservative on purpose: fricatives, breath-level
  tails and the decay into pauses inside a sentence count as speech; only the
  digital silence espeak leaves between some words does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from devstack.scene import sounds, speech
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW = SAMPLE_RATE
FRAME = 160  # 10 ms ground-truth frames
SPEECH_FRAME_DB = -45.0
SCENE_FLOOR_DBFS = -50.0
MAX_PEAK = 0.99
MAX_DURATION_S = 3600
MIN_EVENT_S, MAX_EVENT_S = 1, 4

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_CLASS_WEIGHTS: tuple[tuple[str, float], ...] = tuple(
    (c, 2.0 if c in ("silence", "traffic") else 1.0) for c in CLASSES
)


@dataclass(frozen=True)
class SceneSpec:
    """What to render. Equal specs give identical scenes.

    seed: drives every random draw.  duration_s: whole seconds (1..3600).
    siren_pattern / hilo_hz: passed to ``sounds.synthesize`` for sirens (device shift).
    class_weights: (label, weight) pairs; None = ``DEFAULT_CLASS_WEIGHTS``
    (silence and traffic twice as common as the rest).
    speech_rate: expected fraction of the time covered by utterances (0 = no speech).
    speech_snr_db: (lo, hi) range of the speech level over the scene under it.
    languages: espeak-ng languages to draw from.
    """

    seed: int
    duration_s: int
    siren_pattern: str = "wail"
    hilo_hz: tuple[float, float] = (440.0, 587.0)
    class_weights: tuple[tuple[str, float], ...] | None = None
    speech_rate: float = 0.15
    speech_snr_db: tuple[float, float] = (0.0, 20.0)
    languages: tuple[str, ...] = speech.LANGUAGES

    def __post_init__(self) -> None:
        if not 1 <= self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be 1..{MAX_DURATION_S}, got {self.duration_s}")
        if not 0.0 <= self.speech_rate < 1.0:
            raise ValueError(f"speech_rate must be in [0, 1), got {self.speech_rate}")
        lo, hi = self.speech_snr_db
        if lo > hi:
            raise ValueError(f"speech_snr_db must be (lo, hi) with lo <= hi, got {lo, hi}")
        if self.speech_rate > 0 and not self.languages:
            raise ValueError("speech_rate > 0 needs at least one language")
        for label, w in self.class_weights or ():
            if label not in CLASSES or w < 0:
                raise ValueError(f"bad class weight {label!r}: {w}")


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its ground truth (see the module invariants)."""

    audio: FloatArray  # float32, duration_s * 16000
    window_labels: tuple[str, ...]  # one event label per 1 s window
    speech_frames: BoolArray  # one flag per 10 ms frame (duration_s * 100)
    speech_track: FloatArray  # the scaled clean speech actually mixed in

    def speech_windows(self) -> BoolArray:
        """True for each 1 s window holding at least one ground-truth speech frame."""
        per = WINDOW // FRAME
        return np.asarray(self.speech_frames.reshape(-1, per).any(axis=1), dtype=np.bool_)


def _class_table(spec: SceneSpec) -> tuple[tuple[str, ...], npt.NDArray[np.float64]]:
    pairs = spec.class_weights if spec.class_weights is not None else DEFAULT_CLASS_WEIGHTS
    labels = tuple(label for label, _ in pairs)
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError("class_weights sum to zero")
    return labels, weights / weights.sum()


def _render_events(
    spec: SceneSpec, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], tuple[str, ...]]:
    labels, probs = _class_table(spec)
    n = spec.duration_s * WINDOW
    bed = np.asarray(sounds.background(n, rng), dtype=np.float64)
    window_labels: list[str] = []
    while len(window_labels) < spec.duration_s:
        label = labels[int(rng.choice(len(labels), p=probs))]
        seg_s = int(rng.integers(MIN_EVENT_S, MAX_EVENT_S + 1))
        seg_s = min(seg_s, spec.duration_s - len(window_labels))
        start = len(window_labels) * WINDOW
        event = sounds.synthesize(
            label, seg_s * WINDOW, rng, siren_pattern=spec.siren_pattern, hilo_hz=spec.hilo_hz
        )
        bed[start : start + seg_s * WINDOW] += event
        window_labels.extend([label] * seg_s)
    return bed, tuple(window_labels)


def _frame_rms(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    n = x.size // FRAME
    f = x[: n * FRAME].reshape(n, FRAME)
    return np.asarray(np.sqrt(np.mean(f * f, axis=1)), dtype=np.float64)


def _place_speech(
    spec: SceneSpec,
    scene: npt.NDArray[np.float64],
    rng: np.random.Generator,
    cache_dir: Path | None,
) -> tuple[npt.NDArray[np.float64], BoolArray]:
    """Utterances one after another with exponential gaps sized to ``speech_rate``."""
    n = scene.size
    track = np.zeros(n, dtype=np.float64)
    frames = np.zeros(n // FRAME, dtype=np.bool_)
    if spec.speech_rate <= 0.0:
        return track, frames
    gap_factor = (1.0 - spec.speech_rate) / spec.speech_rate
    pos = int(rng.exponential(2.0 * SAMPLE_RATE * gap_factor))
    floor = 10.0 ** (SCENE_FLOOR_DBFS / 20.0)
    while pos < n:
        lang = spec.languages[int(rng.integers(len(spec.languages)))]
        clip = np.asarray(speech.speech_clip(lang, rng, cache_dir), dtype=np.float64)
        snr_db = float(rng.uniform(*spec.speech_snr_db))
        gap = int(rng.exponential(clip.size * gap_factor))
        clip = clip[: n - pos]
        end = pos + clip.size
        # active speech level: RMS over the clip's frames above the speech threshold
        crms = _frame_rms(clip)
        active = crms > crms.max() * 10.0 ** (SPEECH_FRAME_DB / 20.0) if crms.size else crms > 0
        speech_level = float(np.sqrt(np.mean(crms[active] ** 2))) if active.any() else 0.0
        if speech_level > 0.0:
            under = scene[pos:end]
            scene_rms = max(float(np.sqrt(np.mean(under * under))), floor)
            gain = scene_rms * 10.0 ** (snr_db / 20.0) / speech_level
            track[pos:end] = clip * gain
            # ground truth on the absolute 10 ms grid, relative to this utterance's peak
            # (gaps >= one frame, so no other utterance shares these frames)
            f0, f1 = pos // FRAME, min(-(-end // FRAME), frames.size)
            frms = _frame_rms(track[f0 * FRAME : f1 * FRAME])
            frames[f0:f1] |= frms > frms.max() * 10.0 ** (SPEECH_FRAME_DB / 20.0)
            log.debug(
                "speech %s at %.2fs len %.2fs snr %.1f dB",
                lang,
                pos / SAMPLE_RATE,
                clip.size / SAMPLE_RATE,
                snr_db,
            )
        pos = end + max(gap, FRAME)
    return track, frames


def render_scene(spec: SceneSpec, cache_dir: Path | None = None) -> Scene:
    """Render ``spec``; ``cache_dir`` is the espeak clip cache (default: user cache)."""
    rng = np.random.default_rng(spec.seed)
    scene, window_labels = _render_events(spec, rng)
    track, frames = _place_speech(spec, scene, rng, cache_dir)
    mix = scene + track
    peak = float(np.max(np.abs(mix))) if mix.size else 0.0
    if peak > MAX_PEAK:
        scale = MAX_PEAK / peak
        mix *= scale
        track *= scale
    return Scene(
        audio=mix.astype(np.float32),
        window_labels=window_labels,
        speech_frames=frames,
        speech_track=track.astype(np.float32),
    )


def iter_blocks(scene: Scene, block_samples: int) -> Iterator[FloatArray]:
    """Consecutive blocks of ``scene.audio`` (the last one may be shorter), like a capture."""
    if block_samples <= 0:
        raise ValueError(f"block_samples must be positive, got {block_samples}")
    for i in range(0, scene.audio.size, block_samples):
        yield scene.audio[i : i + block_samples]
