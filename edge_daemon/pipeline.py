"""The on-device path from audio blocks to classified windows.

source blocks → privacy gate (speech windows dropped here, never seen by any later
stage) → upload features (third octaves, 120 ms) → classifier. Nothing in this module stores or sends; the
caller decides what to keep. Invariants: only windows the gate released are featurised;
nothing here knows labels or ground truth (simulations score the windows themselves,
in devstack).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.config import GatePolicy
from edge_daemon.privacy.gate import GateConfig, KeptWindow, PrivacyGate
from edge_daemon.privacy.vad import SileroVad
from fleet_protocol.features import SAMPLE_RATE, features_batch
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)


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
    """Counters of one stream, updated as it flows (read them from any thread)."""

    blocks: int = 0
    windows_in: int = 0
    windows_kept: int = 0
    raw_audio_bytes: int = 0


def make_gate(policy: GatePolicy, vad: SileroVad) -> PrivacyGate:
    overrides = {k: v for k, v in policy.model_dump().items() if v is not None}
    if "detectors" in overrides:
        overrides["detectors"] = tuple(overrides["detectors"])
    return PrivacyGate(dataclasses.replace(GateConfig(), **overrides), vad)


def classify(kept: list[KeptWindow], classifier: Classifier) -> list[Classified]:
    if not kept:
        return []
    feats = features_batch(np.stack([k.audio for k in kept]))
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
    stats: StreamStats | None = None,
) -> StreamStats:
    """Push every block through the gate and classify what it releases.

    ``classifier`` is asked for the model at every block, so a model swapped by an
    update takes effect at the next block without a gap. ``stats`` is updated as the
    stream flows. At the end of a finite stream the gate is flushed.
    """
    stats = stats if stats is not None else StreamStats()

    def release(kept: list[KeptWindow]) -> None:
        for c in classify(kept, classifier()):
            on_window(c)
        stats.windows_in = gate.stats.windows_in
        stats.windows_kept = gate.stats.windows_kept

    for block in blocks:
        stats.blocks += 1
        stats.raw_audio_bytes += 2 * len(block)  # what 16-bit PCM of this audio would weigh
        release(gate.push(block))
    release(gate.flush())
    log.debug("stream done: %d windows in, %d kept", stats.windows_in, stats.windows_kept)
    return stats
