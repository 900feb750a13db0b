"""The base sound-event classifier and the synthetic training set it learns from.

Owns ``AudioCNN`` (the architecture the base model, the LoRA adapters and the edge
runtime all agree on) and ``build_training_set`` (scene-generator windows mixed with a
city background, turned into log-mel features). Invariants:

- the module takes ``(B, N_MELS, N_FRAMES)`` float32 log-mel features
  (``fleet_protocol.features.log_mel_batch``) and returns ``(B, n_classes)`` softmax
  probabilities; the channel dimension is added inside, so the ONNX input is
  ``features`` ``(batch, 64, 98)`` and the output ``probs``;
- no BatchNorm: every Conv2d/Linear weight is exported to ONNX as its own initializer
  under its PyTorch name (``conv1.weight`` ...), which the edge adapter relies on;
- ``ADAPTABLE_LAYERS`` names the layers LoRA may target; fewer than 200k parameters;
- shaped for the int8 recipe (``fleet_model.int8``, ADR 0012): conv2..conv4
  carry ~97% of the multiply-adds and run int8; conv1 (one input channel, strided,
  no pool after it) and the head stay fp32; channel counts stay multiples of 16, the
  block onnxruntime's fp32 kernels want on x86, so int8 is compared with fast fp32.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from devstack.scene.sounds import background, synthesize
from fleet_protocol.features import N_FRAMES, N_MELS, WINDOW_SAMPLES, log_mel_batch
from fleet_protocol.labels import CLASS_INDEX, CLASSES

log = logging.getLogger(__name__)

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4")
LINEAR_LAYERS = ("fc1", "fc2")
ADAPTABLE_LAYERS = CONV_LAYERS + LINEAR_LAYERS
SNR_DB = (6.0, 35.0)  # event over background
GAIN_DB = (-6.0, 6.0)  # overall gain after mixing (microphone sensitivity, distance)
MAX_PER_CLASS = 100_000
FEATURE_CHUNK = 128  # windows rendered and featurised at a time


class AudioCNN(nn.Module):
    """A strided patch conv, three conv blocks, a mean over time, two linear layers.

    ``forward`` returns probabilities (what the device consumes); ``logits`` returns
    the pre-softmax scores, which training uses with cross-entropy.
    """

    def __init__(self, n_classes: int = len(CLASSES), width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        w = width
        # A strided 4x4 patch conv, no pool after it: (64, 98) -> (32, 25) in one step.
        # Its int8 form is slow (one input channel) and an fp32 pool between it and the
        # int8 convs runs unfused, so this block stays fp32 and cheap (ADR 0012).
        self.conv1 = nn.Conv2d(1, w, kernel_size=4, stride=(2, 4), padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(4 * w, 4 * w, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(4 * w * (N_MELS // 8), hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        self.n_classes = n_classes

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.unsqueeze(1)  # (B, 1, 64, 98)
        x = self.act(self.conv1(x))  # (B, w, 32, 25)
        x = self.pool(self.act(self.conv2(x)))  # (B, 2w, 16, 12)
        x = self.pool(self.act(self.conv3(x)))  # (B, 4w, 8, 6)
        x = self.act(self.conv4(x))  # (B, 4w, 8, 6)
        # Average over time only: where an event sits in the window does not matter,
        # but its frequency band does (a horn and a two-tone siren differ mostly there).
        x = x.mean(dim=3).flatten(1)  # (B, 4w * 8)
        x = self.act(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features), dim=-1)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def render_windows(
    labels: list[str],
    rng: np.random.Generator,
    *,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    hilo_pairs: tuple[tuple[float, float], ...] = ((440.0, 587.0),),
) -> npt.NDArray[np.float32]:
    """1 s audio windows, one per label: the event mixed with background at random SNR/gain."""
    out = np.empty((len(labels), WINDOW_SAMPLES), dtype=np.float32)
    for i, label in enumerate(labels):
        pattern = str(rng.choice(list(siren_patterns)))
        pair = hilo_pairs[int(rng.integers(len(hilo_pairs)))]
        event = synthesize(label, WINDOW_SAMPLES, rng, siren_pattern=pattern, hilo_hz=pair)
        bed = background(WINDOW_SAMPLES, rng).astype(np.float64)
        if label == "silence":
            bed_gain = 10.0 ** (rng.uniform(-40.0, 0.0) / 20.0)  # from inaudible to the city bed
        else:
            ev_rms = float(np.sqrt(np.mean(event.astype(np.float64) ** 2)))
            bed_rms = float(np.sqrt(np.mean(bed**2))) + 1e-12
            bed_gain = ev_rms / bed_rms / 10.0 ** (rng.uniform(*SNR_DB) / 20.0)
        mix = (event + bed_gain * bed) * 10.0 ** (rng.uniform(*GAIN_DB) / 20.0)
        out[i] = np.clip(mix, -1.0, 1.0)
    return out


def build_training_set(
    rng: np.random.Generator,
    n_per_class: int,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    *,
    classes: tuple[str, ...] = CLASSES,
    hilo_pairs: tuple[tuple[float, float], ...] = ((440.0, 587.0),),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n_per_class`` windows of each class in ``classes``, shuffled.

    Returns features ``(N, 64, 98)`` float32 and labels ``(N,)`` int64 (indices into
    ``CLASSES``). Sirens use a pattern drawn from ``siren_patterns``.
    """
    if not 0 < n_per_class <= MAX_PER_CLASS:
        raise ValueError(f"n_per_class must be in 1..{MAX_PER_CLASS}, got {n_per_class}")
    names = [c for c in classes for _ in range(n_per_class)]
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    feats = np.empty((len(names), N_MELS, N_FRAMES), dtype=np.float32)
    for i in range(0, len(names), FEATURE_CHUNK):  # bounded memory: audio never all at once
        chunk = names[i : i + FEATURE_CHUNK]
        audio = render_windows(chunk, rng, siren_patterns=siren_patterns, hilo_pairs=hilo_pairs)
        feats[i : i + len(chunk)] = log_mel_batch(audio)
    labels = np.array([CLASS_INDEX[c] for c in names], dtype=np.int64)
    log.debug("built %d windows of %d classes", len(names), len(classes))
    return feats, labels
