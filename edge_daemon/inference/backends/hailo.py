"""The Hailo backend plugin: a Hailo-8/8L (Raspberry Pi AI HAT+) through HailoRT.

Owns: opening the device and running a HEF (compiled off the device with Hailo's
Dataflow Compiler from the fp32 ONNX base) on feature batches.

Invariants:
- ``hailo_platform`` is imported only here, only when this backend is chosen; its
  absence raises ``BackendUnavailableError`` naming the library, and a library with
  no device raises ``BackendUnavailableError`` naming the HAT; the checks run in that
  order (library, device, HEF file) so the message names the first thing missing;
- the HEF is the base model only: a device cannot merge an adapter into a HEF, so an
  adapter-merged model on this backend is refused with ``InferenceError`` (ADR 0011);
- the HEF is read capped at ``MAX_HEF_BYTES``; ``model_sha256`` is its hash.
Not exercised on hardware in this repository (no HAT in CI); the error paths are tested.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import BackendUnavailableError, InferenceError
from edge_daemon.inference.backends.config import HailoBackendConfig
from edge_daemon.inference.backends.files import ModelFiles
from edge_daemon.inference.onnx_backend import predict_in_batches

log = logging.getLogger(__name__)

MAX_HEF_BYTES = 64 * 1024 * 1024

LIBRARY_MISSING = (
    "Hailo backend: the HailoRT Python library (module hailo_platform) is not installed."
    " Install HailoRT and its PCIe driver (Raspberry Pi OS: `sudo apt install hailo-all`),"
    " or set model.backend.type to onnxruntime or litert"
)
DEVICE_MISSING = (
    "Hailo backend: HailoRT is installed but no Hailo device was found. Is the AI HAT+"
    " (Hailo-8/8L) attached and its driver loaded (/dev/hailo0)? Or set"
    " model.backend.type to onnxruntime or litert"
)


def _import_hailo() -> Any:
    try:
        return importlib.import_module("hailo_platform")
    except ImportError as exc:
        raise BackendUnavailableError(LIBRARY_MISSING) from exc


class HailoClassifier:
    """One configured network group on a Hailo device, float32 in and out."""

    def __init__(self, cfg: HailoBackendConfig) -> None:
        hp = _import_hailo()
        try:
            devices = list(hp.Device.scan())
        except Exception as exc:  # HailoRT raises its own status errors
            raise BackendUnavailableError(f"{DEVICE_MISSING} ({exc})") from exc
        if not devices or (cfg.device_id is not None and cfg.device_id not in map(str, devices)):
            raise BackendUnavailableError(
                DEVICE_MISSING + (f" (wanted {cfg.device_id}, found {devices})" if devices else "")
            )
        self.path = Path(cfg.hef)
        try:
            size = self.path.stat().st_size
            if size > MAX_HEF_BYTES:
                raise InferenceError(f"{self.path}: {size} bytes exceeds {MAX_HEF_BYTES}")
            data = self.path.read_bytes()
        except OSError as exc:
            raise InferenceError(f"Hailo backend: cannot read HEF {self.path}: {exc}") from exc
        self.model_sha256: str = hashlib.sha256(data).hexdigest()
        try:
            hef = hp.HEF(str(self.path))
            params = hp.VDevice.create_params()
            if cfg.device_id is not None:
                params.device_ids = [cfg.device_id]
            self._vdevice = hp.VDevice(params)
            conf = hp.ConfigureParams.create_from_hef(hef, interface=hp.HailoStreamInterface.PCIe)
            self._group = self._vdevice.configure(hef, conf)[0]
            self._group_params = self._group.create_params()
            f32 = hp.FormatType.FLOAT32
            self._in_params = hp.InputVStreamParams.make(self._group, format_type=f32)
            self._out_params = hp.OutputVStreamParams.make(self._group, format_type=f32)
            self._in_name = hef.get_input_vstream_infos()[0].name
            out_info = hef.get_output_vstream_infos()[0]
            self._out_name = out_info.name
            self.n_classes: int = int(np.prod(out_info.shape))
            self._hp = hp
        except Exception as exc:
            raise InferenceError(f"Hailo backend: cannot configure {self.path}: {exc}") from exc

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return predict_in_batches(features, self.n_classes, self._run)

    def _run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        try:
            hp, group = self._hp, self._group
            with (
                hp.InferVStreams(group, self._in_params, self._out_params) as pipe,
                group.activate(self._group_params),
            ):
                res = pipe.infer({self._in_name: x[..., None]})  # NHWC, C = 1
        except Exception as exc:
            raise InferenceError(f"Hailo inference failed on {self.path}: {exc}") from exc
        return np.asarray(res[self._out_name], dtype=np.float32).reshape(x.shape[0], -1)


def load(
    cfg: HailoBackendConfig, files: ModelFiles, threads: int, *, merged: bool
) -> HailoClassifier:
    if merged:
        raise InferenceError(
            "Hailo backend runs only the base HEF: an adapter cannot be merged into a HEF on"
            " the device (recompile in the cloud, or use the onnxruntime or litert backend)"
        )
    return HailoClassifier(cfg)
