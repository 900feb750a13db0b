"""The onnxruntime classifier backend: upload features in, class probabilities out.

Owns loading a model file into an ``InferenceSession`` and checking that it speaks the
contract: one input ``features`` ``(batch, N_BANDS, N_FRAMES)`` float32, one output
``probs`` ``(batch, n_classes)``. Invariants: the model file is read once, capped at
``MAX_MODEL_BYTES``, and ``model_sha256`` is the hash of exactly the bytes the session
runs; every runtime failure surfaces as ``InferenceError``. No torch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge_daemon.errors import InferenceError
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "probs"
MAX_MODEL_BYTES = 64 * 1024 * 1024
MAX_BATCH = 1024


class OnnxClassifier:
    """A CPU onnxruntime session over one classifier model file."""

    def __init__(self, model_path: Path, intra_op_threads: int = 1) -> None:
        self.path = Path(model_path)
        try:
            size = self.path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise InferenceError(f"{self.path}: {size} bytes exceeds {MAX_MODEL_BYTES}")
            data = self.path.read_bytes()
        except OSError as exc:
            raise InferenceError(f"cannot read model {self.path}: {exc}") from exc
        self.model_sha256: str = hashlib.sha256(data).hexdigest()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(intra_op_threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"cannot load model {self.path}: {exc}") from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise InferenceError(
                f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r},"
                f" got {inputs} -> {outputs}"
            )
        shape = self._session.get_outputs()[outputs.index(OUTPUT_NAME)].shape
        n_out = shape[-1] if shape and isinstance(shape[-1], int) else len(CLASSES)
        self.n_classes: int = int(n_out)
        log.debug(
            "loaded %s (sha256 %s, %d classes)", self.path, self.model_sha256[:12], self.n_classes
        )

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities ``(B, n_classes)`` for features ``(B, N_BANDS, N_FRAMES)``."""
        return predict_in_batches(features, self.n_classes, self._run)

    def _run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        try:
            (probs,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        except Exception as exc:
            raise InferenceError(f"inference failed on {self.path}: {exc}") from exc
        return np.asarray(probs, dtype=np.float32)


def predict_in_batches(
    features: npt.NDArray[np.float32],
    n_classes: int,
    run: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
) -> npt.NDArray[np.float32]:
    """The input contract every backend shares: ``(B, N_BANDS, N_FRAMES)`` or
    ``InferenceError``; an empty batch gives ``(0, n_classes)``; ``run`` sees contiguous
    float32 batches of at most ``MAX_BATCH``."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (N_BANDS, N_FRAMES):
        raise InferenceError(f"expected (batch, {N_BANDS}, {N_FRAMES}) features, got {x.shape}")
    if x.shape[0] == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    parts = [run(x[i : i + MAX_BATCH]) for i in range(0, x.shape[0], MAX_BATCH)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
