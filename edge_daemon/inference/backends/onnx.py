"""The onnxruntime backend plugin: the existing ``OnnxClassifier`` behind the factory.

Owns: choosing which model file (int8 or fp32) onnxruntime runs for
``OnnxBackendConfig``. The runtime itself stays in ``edge_daemon.inference.onnx_backend``
(its import path is kept for existing callers).
"""

from __future__ import annotations

from edge_daemon.inference.backends.config import OnnxBackendConfig
from edge_daemon.inference.backends.files import ModelFiles
from edge_daemon.inference.onnx_backend import OnnxClassifier

__all__ = ["OnnxClassifier", "load"]


def load(cfg: OnnxBackendConfig, files: ModelFiles, threads: int) -> OnnxClassifier:
    path = files.int8 if cfg.precision == "int8" else files.fp32
    return OnnxClassifier(path, threads)
