"""Scoring a device against the simulated city's ground truth (simulation only).

The daemon knows no labels; devstack, which made the audio, does. This module runs the
device's own gate and a device model (the base, or the adapter-merged model a device
installed) on scene audio and scores the windows the gate released:

- ``evaluate``: accuracy over all kept windows, and over the shifted classes (the
  device-specific pattern the base model never saw);
- ``leakage``: speech frames inside windows the gate released, of all speech frames;
  the gate is deterministic and independent of block sizes (tests/unit/test_privacy_gate.py),
  so this is exactly what the device's gate released from the same audio;
- ``uploaded_speech_frames``: speech frames inside the windows the cloud actually
  stored for a device (joined by capture time).

Invariant: nothing here feeds back into a device or the cloud.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from devstack.city import Truth
from edge_daemon.config import DeviceConfig, GatePolicy
from edge_daemon.inference.adapter import merged_fp32_path
from edge_daemon.inference.backends import ModelFiles, make_classifier
from edge_daemon.pipeline import Classified, Classifier, make_gate, run_stream
from edge_daemon.privacy.vad import SileroVad
from fleet_protocol.features import HOP, SAMPLE_RATE, WINDOW_SAMPLES
from fleet_protocol.labels import WINDOW_MS

FRAMES_PER_WINDOW = WINDOW_SAMPLES // HOP
BLOCK = SAMPLE_RATE // 10


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    shifted_accuracy: float
    n_windows: int
    n_shifted: int


def _blocks(audio: npt.NDArray[np.float32]) -> Iterator[npt.NDArray[np.float32]]:
    for i in range(0, len(audio), BLOCK):
        yield audio[i : i + BLOCK]


def kept_windows(
    audio: npt.NDArray[np.float32], policy: GatePolicy, classifier: Classifier
) -> list[Classified]:
    """Every window the device's gate releases from ``audio``, classified."""
    out: list[Classified] = []
    run_stream(
        _blocks(audio), make_gate(policy, SileroVad(threads=1)), lambda: classifier, out.append
    )
    return out


def device_classifier(cfg: DeviceConfig, model_path: Path) -> Classifier:
    """The model a device runs from ``model_path`` (its base, or an installed adapter's
    int8, as its status report names it), on the device's configured backend."""
    if model_path == cfg.model.base_int8:
        files, merged = ModelFiles(cfg.model.base_fp32, cfg.model.base_int8), False
    else:
        files, merged = ModelFiles(merged_fp32_path(model_path), model_path), True
    return make_classifier(cfg.model.backend, files, cfg.model.threads, merged=merged)


def evaluate(
    audio: npt.NDArray[np.float32],
    truth: Truth,
    policy: GatePolicy,
    classifier: Classifier,
    shifted: tuple[str, ...] = ("siren",),
) -> EvalResult:
    hits = [
        (c.label == truth.window_labels[c.index], truth.window_labels[c.index] in shifted)
        for c in kept_windows(audio, policy, classifier)
    ]
    every = [ok for ok, _ in hits]
    shift = [ok for ok, is_shifted in hits if is_shifted]
    return EvalResult(
        accuracy=float(np.mean(every)) if every else 0.0,
        shifted_accuracy=float(np.mean(shift)) if shift else 0.0,
        n_windows=len(every),
        n_shifted=len(shift),
    )


def speech_in_windows(truth: Truth, windows: list[int]) -> int:
    frames = truth.speech_frames
    return int(
        sum(frames[i * FRAMES_PER_WINDOW : (i + 1) * FRAMES_PER_WINDOW].sum() for i in windows)
    )


def leakage(
    audio: npt.NDArray[np.float32], truth: Truth, policy: GatePolicy, classifier: Classifier
) -> tuple[int, int]:
    """(speech frames in the stream, speech frames in windows the gate released)."""
    kept = [c.index for c in kept_windows(audio, policy, classifier)]
    return int(truth.speech_frames.sum()), speech_in_windows(truth, kept)


def uploaded_speech_frames(truth: Truth, captured_at_ms: list[int]) -> int:
    """Speech frames inside the stored windows that started at ``captured_at_ms``."""
    windows = [round((t - truth.start_ms) / WINDOW_MS) for t in captured_at_ms]
    return speech_in_windows(truth, [w for w in windows if 0 <= w < len(truth.window_labels)])
