"""Inference backends as plugins, chosen by ``model.backend.type`` in the device config.

Owns: the factory ``make_classifier`` that maps a backend config (``config.py``: one
pydantic model per plugin, a discriminated union on ``type``) to its implementation:
``onnx`` (onnxruntime, int8 by default), ``litert`` (ai-edge-litert over the base's
.tflite, converted in the cloud, with merged weights patched in) and ``hailo`` (HailoRT,
import guarded). Design: ADR 0011.

Invariants: importing this package imports no runtime library; each plugin module is
imported only when its backend is made; every backend returns a ``Classifier`` with the
same contract (features ``(B, N_BANDS, N_FRAMES)`` -> probabilities ``(B, n_classes)``).
"""

from __future__ import annotations

from edge_daemon.inference.backends.config import (
    BackendConfig,
    HailoBackendConfig,
    LiteRtBackendConfig,
    OnnxBackendConfig,
)
from edge_daemon.inference.backends.files import Classifier, ModelFiles

__all__ = [
    "BackendConfig",
    "Classifier",
    "HailoBackendConfig",
    "LiteRtBackendConfig",
    "ModelFiles",
    "OnnxBackendConfig",
    "make_classifier",
]


def make_classifier(
    cfg: BackendConfig, files: ModelFiles, threads: int = 1, *, merged: bool = False
) -> Classifier:
    """The classifier for ``files`` on backend ``cfg``. ``merged``: the files are an
    adapter merged into the base (every backend but Hailo runs those)."""
    if isinstance(cfg, OnnxBackendConfig):
        from edge_daemon.inference.backends import onnx

        return onnx.load(cfg, files, threads)
    if isinstance(cfg, LiteRtBackendConfig):
        from edge_daemon.inference.backends import litert

        return litert.load(cfg, files, threads)
    from edge_daemon.inference.backends import hailo

    return hailo.load(cfg, files, threads, merged=merged)
