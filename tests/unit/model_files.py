"""An untrained base model laid out as pretraining lays it out, for backend and int8 tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from cloud_sidecar.model import AudioCNN
from cloud_sidecar.pretrain import export_onnx, quantize_file
from fleet_model import calibration_path, encode_calibration
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256


def random_windows(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """``n`` feature-shaped windows of noise at a feature-like level."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, N_BANDS, N_FRAMES)) * 1.5 + 0.5).astype(np.float32)


def untrained_base(
    d: Path, calibration_windows: npt.NDArray[np.float32]
) -> tuple[Path, Path, Path]:
    """(fp32, calibration, int8) of ``AudioCNN`` with seed-0 weights, written under ``d``."""
    torch.manual_seed(0)
    fp32 = d / "base.fp32.onnx"
    calibration = calibration_path(fp32)
    calibration.write_bytes(encode_calibration(calibration_windows))
    export_onnx(AudioCNN(), fp32, calibration_sha256=file_sha256(calibration))
    return fp32, calibration, quantize_file(fp32, d / "base.int8.onnx", calibration=calibration)
