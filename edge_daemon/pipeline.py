"""The on-device path from audio blocks to classified windows.

source blocks → privacy gate (speech windows dropped here, never seen by any later
stage) → log-mel features → classifier. Nothing in this module stores or sends; the
caller decides what to keep. Invariant: only windows the gate released are featurised.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.capture import AudioSource, GroundTruth
from edge_daemon.config import GatePolicy
from edge_daemon.privacy.gate import GateConfig, KeptWindow, PrivacyGate
from edge_daemon.privacy.vad import SileroVad
from fleet_protocol.features import HOP, SAMPLE_RATE, WINDOW_SAMPLES, log_mel_batch
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)
FRAMES_PER_WINDOW = WINDOW_SAMPLES // HOP  # 10 ms ground-truth frames per 1 s window


class Classifier(Protocol):
    model_sha256: str

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class Classified:
    index: int
    start_s: float
    label: str
    score: float
    features: npt.NDArray[np.float32]
    model_sha256: str


@dataclass
class StreamStats:
    windows_in: int = 0
    windows_kept: int = 0
    raw_audio_bytes: int = 0
    speech_frames_in: int = 0
    speech_frames_leaked: int = 0
    kept_indices: list[int] = field(default_factory=list)


def make_gate(policy: GatePolicy, vad: SileroVad) -> PrivacyGate:
    overrides = {k: v for k, v in policy.model_dump().items() if v is not None}
    if "detectors" in overrides:
        overrides["detectors"] = tuple(overrides["detectors"])
    return PrivacyGate(dataclasses.replace(GateConfig(), **overrides), vad)


def classify(kept: list[KeptWindow], classifier: Classifier) -> list[Classified]:
    if not kept:
        return []
    feats = log_mel_batch(np.stack([k.audio for k in kept]))
    probs = classifier.predict(feats)
    top = probs.argmax(axis=1)
    return [
        Classified(
            index=k.index,
            start_s=k.start_sample / SAMPLE_RATE,
            label=CLASSES[int(top[i])],
            score=float(probs[i, top[i]]),
            features=feats[i],
            model_sha256=classifier.model_sha256,
        )
        for i, k in enumerate(kept)
    ]


def run_stream(
    blocks: Iterable[npt.NDArray[np.float32]],
    gate: PrivacyGate,
    classifier: Callable[[], Classifier],
    on_window: Callable[[Classified], None],
    truth: GroundTruth | None = None,
) -> StreamStats:
    """Push every block through the gate and classify what it releases."""
    stats = StreamStats()
    for block in blocks:
        stats.raw_audio_bytes += 2 * len(block)  # what 16-bit PCM of this audio would weigh
        for c in classify(gate.push(block), classifier()):
            stats.kept_indices.append(c.index)
            on_window(c)
    for c in classify(gate.flush(), classifier()):
        stats.kept_indices.append(c.index)
        on_window(c)
    stats.windows_in = gate.stats.windows_in
    stats.windows_kept = gate.stats.windows_kept
    if truth is not None:
        frames = truth.speech_frames
        stats.speech_frames_in = int(frames.sum())
        stats.speech_frames_leaked = int(
            sum(
                frames[i * FRAMES_PER_WINDOW : (i + 1) * FRAMES_PER_WINDOW].sum()
                for i in stats.kept_indices
            )
        )
    log.debug("stream done: %d windows in, %d kept", stats.windows_in, stats.windows_kept)
    return stats


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    shifted_accuracy: float
    n_windows: int
    n_shifted: int
    speech_frames_in: int
    speech_frames_leaked: int


def evaluate(
    source: AudioSource, gate: PrivacyGate, classifier: Classifier, shifted: tuple[str, ...]
) -> EvalResult:
    """Accuracy on the windows the gate keeps from a held-out source with ground truth."""
    truth = source.truth()
    if truth is None:
        raise ValueError("evaluation needs a source with ground truth")
    hits: list[tuple[bool, bool]] = []

    def score(c: Classified) -> None:
        label = truth.window_labels[c.index]
        hits.append((c.label == label, label in shifted))

    stats = run_stream(source.blocks(), gate, lambda: classifier, score, truth)
    all_ok = [ok for ok, _ in hits]
    shifted_ok = [ok for ok, is_shifted in hits if is_shifted]
    return EvalResult(
        accuracy=float(np.mean(all_ok)) if all_ok else 0.0,
        shifted_accuracy=float(np.mean(shifted_ok)) if shifted_ok else 0.0,
        n_windows=len(all_ok),
        n_shifted=len(shifted_ok),
        speech_frames_in=stats.speech_frames_in,
        speech_frames_leaked=stats.speech_frames_leaked,
    )
