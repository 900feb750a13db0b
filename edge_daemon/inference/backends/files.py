"""Which files make up one deployable model, and what every backend must offer.

Owns: ``ModelFiles`` (the fp32 ONNX model, from which LiteRT builds its .tflite and
adapters are merged, and its int8 quantization that onnxruntime runs by default) and
the ``Classifier`` protocol the daemon codes against. Pure types, no runtime imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ModelFiles:
    """One model in its two ONNX forms (same weights): ``fp32`` and ``int8``."""

    fp32: Path
    int8: Path


class Classifier(Protocol):
    """What a backend gives the daemon: probabilities for log-mel feature batches."""

    path: Path
    model_sha256: str  # sha256 of exactly the bytes the runtime executes
    n_classes: int

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(B, N_MELS, N_FRAMES)`` float32 -> ``(B, n_classes)`` probabilities."""
        ...
