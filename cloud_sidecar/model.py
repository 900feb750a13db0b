"""The base sound-event classifier.

Owns ``AudioCNN``, the architecture the base model, the LoRA adapters and the edge
runtime all agree on. What it learns from is a dataset on disk
(``cloud_sidecar.audio_dataset``); the synthetic city's windows live in devstack.
Invariants:

- the module takes ``(B, N_BANDS, N_FRAMES)`` float32 upload features (third-octave
  bands at 120 ms, ``fleet_protocol.features.features_batch``) and returns
  ``(B, n_classes)`` softmax probabilities; the channel dimension is added inside, so the
  ONNX input is ``features`` ``(batch, 20, 8)`` and the output ``probs``;
- no BatchNorm: every Conv2d/Linear weight is exported to ONNX as its own initializer
  under its PyTorch name (``conv1.weight`` ...), which the edge adapter relies on;
- ``ADAPTABLE_LAYERS`` names the layers LoRA may target; fewer than 200k parameters;
- shaped for the int8 recipe (``fleet_model.int8``, ADR 0012): conv2..conv4
  carry ~97% of the ~1.9 M multiply-adds and run int8; conv1 (one input channel) and the
  head stay fp32; channel counts stay multiples of 16, the
  block onnxruntime's fp32 kernels want on x86, so int8 is compared with fast fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from fleet_protocol.features import N_BANDS
from fleet_protocol.labels import CLASSES

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4")
LINEAR_LAYERS = ("fc1", "fc2")
ADAPTABLE_LAYERS = CONV_LAYERS + LINEAR_LAYERS


class AudioCNN(nn.Module):
    """Four 3x3 conv blocks, a mean over time, two linear layers.

    ``forward`` returns probabilities (what the device consumes); ``logits`` returns
    the pre-softmax scores, which training uses with cross-entropy.
    """

    def __init__(self, n_classes: int = len(CLASSES), width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        w = width
        # One input channel: its int8 form is slow, so this block stays fp32 (ADR 0012).
        self.conv1 = nn.Conv2d(1, w, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(4 * w, 4 * w, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(4 * w * (N_BANDS // 4), hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        self.n_classes = n_classes

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.unsqueeze(1)  # (B, 1, 20, 8)
        x = self.act(self.conv1(x))  # (B, w, 20, 8)
        x = self.pool(self.act(self.conv2(x)))  # (B, 2w, 10, 4)
        x = self.pool(self.act(self.conv3(x)))  # (B, 4w, 5, 2)
        x = self.act(self.conv4(x))  # (B, 4w, 5, 2)
        # Average over time only: where an event sits in the window does not matter,
        # but its frequency band does (a horn and a two-tone siren differ mostly there).
        x = x.mean(dim=3).flatten(1)  # (B, 4w * 5)
        x = self.act(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features), dim=-1)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
