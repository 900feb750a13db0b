"""The LiteRT backend plugin: ``ai-edge-litert``'s interpreter over the base's .tflite.

Owns: the TFLite bytes of one model and running them on the CPU (XNNPACK). The base's
``.tflite`` is converted once in the cloud by TensorFlow (``cloud_sidecar.export_tflite``)
and provisioned beside the base fp32 ONNX (``fleet_model.tflite_patch.tflite_path``); an
adapter-merged model is that file with its merged weights patched in
(``fleet_model.tflite_patch.patch_weights``): no converter and no TensorFlow here.

Invariants:
- the TFLite bytes are derived on every load from the base .tflite, the base fp32 ONNX
  and the model's fp32 ONNX (base or adapter-merged), so they can never be stale against
  an adapter, and a .tflite converted from another base is refused; ``model_sha256``
  hashes those bytes;
- every file is read once, capped (``MAX_MODEL_BYTES``, ``MAX_TFLITE_BYTES``);
- a missing ``ai_edge_litert`` raises ``BackendUnavailableError`` naming the package;
  every other failure (a missing .tflite included) is ``InferenceError``;
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
from fleet_model import ModelError
from fleet_protocol.features import N_BANDS, N_FRAMES

log = logging.getLogger(__name__)


def _read(path: Path, cap: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > cap:
            raise InferenceError(f"{path}: {size} bytes exceeds {cap}")
        return path.read_bytes()
    except OSError as exc:
        raise InferenceError(f"cannot read model {path}: {exc}") from exc


def _onnx(path: Path) -> Any:
    import onnx

    data = _read(path, MAX_MODEL_BYTES)
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise InferenceError(f"cannot parse ONNX model {path}: {exc}") from exc


def tflite_for(files: ModelFiles) -> bytes:
    """The TFLite bytes that run ``files.fp32``: the base's .tflite, merged weights patched in."""
    from fleet_model.tflite_patch import MAX_TFLITE_BYTES, patch_weights, tflite_path

    base_fp32 = files.base_fp32 or files.fp32
    model = _onnx(files.fp32)
    base = model if files.base_fp32 is None else _onnx(base_fp32)
    if not tflite_path(base_fp32).is_file():
        raise InferenceError(
            f"LiteRT needs {tflite_path(base_fp32)}, the base converted by pretraining and"
            " provisioned beside the base fp32 model; or set model.backend.type to onnxruntime"
        )
    base_tflite = _read(tflite_path(base_fp32), MAX_TFLITE_BYTES)
    try:
        return patch_weights(base_tflite, base, model)
    except ModelError as exc:
        raise InferenceError(f"LiteRT: {tflite_path(base_fp32)}: {exc}") from exc


class LiteRtClassifier:
    """A LiteRT interpreter over the TFLite form of one fp32 ONNX model."""

    def __init__(self, files: ModelFiles, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]
        except ImportError as exc:
            raise BackendUnavailableError(
                "LiteRT backend: the Python package ai-edge-litert is not installed"
                " (pip install 'sovereign-edge[edge]'; tflite-runtime does not work with"
                " numpy 2); or set model.backend.type to onnxruntime"
            ) from exc
        self.path = Path(files.fp32)
        self._tflite = tflite_for(files)
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
            self._it.resize_tensor_input(self._in, [batch, N_BANDS, N_FRAMES], strict=False)
            self._it.allocate_tensors()
            self._batch = batch

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities ``(B, n_classes)`` for features ``(B, N_BANDS, N_FRAMES)``."""
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
    return LiteRtClassifier(files, threads)
