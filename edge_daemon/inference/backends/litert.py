"""The LiteRT backend plugin: ``ai-edge-litert``'s interpreter over a .tflite we write.

Owns: turning the fp32 ONNX model (the base, or the adapter-merged copy that
``apply_adapter`` leaves beside the int8 model) into TFLite bytes with
``tflite_writer`` and running them on the CPU (XNNPACK).

Invariants:
- the .tflite is rebuilt in memory from the fp32 ONNX on every load (a few ms), so it
  can never be stale against an adapter; ``model_sha256`` hashes those TFLite bytes;
- the ONNX file is read once, capped at ``MAX_MODEL_BYTES``;
- a missing ``ai_edge_litert`` raises ``BackendUnavailableError`` naming the package;
  every other failure is ``InferenceError``;
- batches are any size up to ``MAX_BATCH`` (larger ones are split); the interpreter is
  resized only when the batch size changes. Not thread-safe (one daemon thread).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import BackendUnavailableError, InferenceError
from edge_daemon.inference.backends.config import LiteRtBackendConfig
from edge_daemon.inference.backends.files import ModelFiles
from edge_daemon.inference.onnx_backend import MAX_MODEL_BYTES, predict_in_batches
from fleet_protocol.features import N_FRAMES, N_MELS

log = logging.getLogger(__name__)


def tflite_from_onnx(fp32_path: Path) -> bytes:
    """The TFLite bytes for an fp32 ONNX classifier file (capped read)."""
    import onnx

    from edge_daemon.inference.backends.tflite_writer import onnx_to_tflite

    try:
        size = fp32_path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise InferenceError(f"{fp32_path}: {size} bytes exceeds {MAX_MODEL_BYTES}")
        data = fp32_path.read_bytes()
        model = onnx.load_from_string(data)
    except OSError as exc:
        raise InferenceError(f"cannot read model {fp32_path}: {exc}") from exc
    except Exception as exc:  # onnx raises DecodeError and friends
        raise InferenceError(f"cannot parse ONNX model {fp32_path}: {exc}") from exc
    return onnx_to_tflite(model)


class LiteRtClassifier:
    """A LiteRT interpreter over the TFLite form of one fp32 ONNX model."""

    def __init__(self, fp32_path: Path, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]
        except ImportError as exc:
            raise BackendUnavailableError(
                "LiteRT backend: the Python package ai-edge-litert is not installed"
                " (pip install 'sovereign-edge[edge]'; tflite-runtime does not work with"
                " numpy 2); or set model.backend.type to onnxruntime"
            ) from exc
        self.path = Path(fp32_path)
        self._tflite = tflite_from_onnx(self.path)
        self.model_sha256: str = hashlib.sha256(self._tflite).hexdigest()
        try:
            self._it: Any = Interpreter(model_content=self._tflite, num_threads=max(1, threads))
            self._in = self._it.get_input_details()[0]["index"]
            self._out = self._it.get_output_details()[0]["index"]
            self._batch = 0
            self._resize(1)
            self.n_classes: int = int(self._it.get_output_details()[0]["shape"][-1])
        except InferenceError:
            raise
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError
            raise InferenceError(f"LiteRT cannot load the model from {self.path}: {exc}") from exc
        log.debug("LiteRT model from %s (tflite sha256 %s)", self.path, self.model_sha256[:12])

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self._it.resize_tensor_input(self._in, [batch, N_MELS, N_FRAMES], strict=False)
            self._it.allocate_tensors()
            self._batch = batch

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities ``(B, n_classes)`` for features ``(B, N_MELS, N_FRAMES)``."""
        return predict_in_batches(features, self.n_classes, self._run)

    def _run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        try:
            self._resize(x.shape[0])
            self._it.set_tensor(self._in, x)
            self._it.invoke()
            out = np.array(self._it.get_tensor(self._out), dtype=np.float32)
        except Exception as exc:
            raise InferenceError(f"LiteRT inference failed on {self.path}: {exc}") from exc
        return out


def load(cfg: LiteRtBackendConfig, files: ModelFiles, threads: int) -> LiteRtClassifier:
    return LiteRtClassifier(files.fp32, threads)
