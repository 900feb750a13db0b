"""Which files make up one deployable model, and what every backend must offer.

Owns: ``ModelFiles`` (the fp32 ONNX model, into which adapters are merged, its int8
quantization that onnxruntime runs by default, and for a merged model the base it was
merged from, whose converted .tflite LiteRT patches) and the ``Classifier`` protocol the
daemon codes against. Pure types, no runtime imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ModelFiles:
    """One model in its two ONNX forms (same weights): ``fp32`` and ``int8``.

    ``base_fp32``: for an adapter-merged model, the base fp32 ONNX it was merged from
    (its ``.tflite`` sits beside it); ``None`` when ``fp32`` is the base itself.
    """

    fp32: Path
    int8: Path
    base_fp32: Path | None = None


class Classifier(Protocol):
    """What a backend gives the daemon: probabilities for upload-feature batches."""

    path: Path
    model_sha256: str  # sha256 of exactly the bytes the runtime executes
    n_classes: int

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``(B, N_BANDS, N_FRAMES)`` float32 -> ``(B, n_classes)`` probabilities."""
        ...
