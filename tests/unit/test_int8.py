"""The int8 recipe: static QDQ, deterministic, calibrated on the set the base names.

An untrained ``AudioCNN`` exported as pretraining exports it: what is checked here is
the graph, the bytes and the refusals. Agreement with fp32 on a trained model is in
``test_model_pipeline.py``.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from cloud_sidecar.errors import TrainingError
from cloud_sidecar.pretrain import quantize_file
from edge_daemon.errors import OtaError
from edge_daemon.inference.adapter import apply_adapter
from edge_daemon.inference.onnx_backend import OnnxClassifier
from fleet_model.adapter import (
    EdgeAdapter,
    LowRankLayer,
    encode_edge_adapter,
)
from fleet_model.errors import CalibrationError
from fleet_model.int8 import (
    MAX_CALIBRATION_BYTES,
    MAX_CALIBRATION_WINDOWS,
    QUANT_LAYERS,
    RECIPE,
    calibration_path,
    encode_calibration,
    parse_calibration,
    round_range,
)
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256
from tests.unit.model_files import random_windows, untrained_base

F32 = npt.NDArray[np.float32]
FP32_LAYERS = ("conv1", "fc1", "fc2")


_windows = random_windows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(fp32, calibration, int8) of an untrained model, as pretraining lays them out."""
    return untrained_base(tmp_path_factory.mktemp("base"), _windows(30, seed=1))


def test_calibration_set_lives_beside_the_base_fp32() -> None:
    assert calibration_path(Path("/m/base.fp32.onnx")) == Path("/m/base.calib.npy")
    assert calibration_path(Path("/m/model.onnx")) == Path("/m/model.calib.npy")


def test_int8_model_is_static_qdq_with_int8_convs_and_an_fp32_head(
    base: tuple[Path, Path, Path],
) -> None:
    model = onnx.load(str(base[2]))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} & set(ops)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in QUANT_LAYERS:
        assert inits[f"{layer}.weight_quantized"].dtype == np.int8
        assert inits[f"{layer}.bias_quantized"].dtype == np.int32
        assert f"{layer}.weight" not in inits  # no fp32 copy of a quantized weight
    for layer in FP32_LAYERS:
        assert inits[f"{layer}.weight"].dtype == np.float32
    assert {p.key: p.value for p in model.metadata_props}["int8_recipe"] == RECIPE
    # onnxruntime turns the QDQ pattern into integer kernels (what makes it fast).
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(base[2].with_name("optimized.onnx"))
    ort.InferenceSession(str(base[2]), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == len(QUANT_LAYERS)
    assert "Conv" in fused  # conv1 stays fp32


def test_quantization_is_deterministic_and_leaves_the_fp32_model_untouched(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    fp32, calibration, int8 = base
    before = fp32.read_bytes()
    again = quantize_file(fp32, tmp_path / "again.int8.onnx", calibration=calibration)
    assert again.read_bytes() == int8.read_bytes()
    assert fp32.read_bytes() == before


def test_int8_probabilities_stay_close_to_fp32(base: tuple[Path, Path, Path]) -> None:
    x = _windows(64, seed=2)
    p32, p8 = OnnxClassifier(base[0]).predict(x), OnnxClassifier(base[2]).predict(x)
    assert float(np.abs(p32 - p8).max()) <= 0.01


def test_another_or_a_missing_calibration_set_is_refused(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.calib.npy"
    other.write_bytes(encode_calibration(_windows(30, seed=3)))
    with pytest.raises(TrainingError, match="not the one"):
        quantize_file(base[0], tmp_path / "x.int8.onnx", calibration=other)
    with pytest.raises(TrainingError, match="cannot read"):
        quantize_file(base[0], tmp_path / "x.int8.onnx", calibration=tmp_path / "missing.npy")
    assert not (tmp_path / "x.int8.onnx").exists()


def test_device_merge_without_its_calibration_set_fails_and_writes_nothing(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    device = tmp_path / "device"
    device.mkdir()
    fp32 = Path(shutil.copy2(base[0], device / "base.fp32.onnx"))
    rng = np.random.default_rng(4)
    layer = LowRankLayer(
        "conv3.weight",
        rng.standard_normal((2, 32, 3, 3)).astype(np.float32),
        rng.standard_normal((64, 2, 1, 1)).astype(np.float32),
        0.1,
    )
    adapter = tmp_path / "a.adapter"
    adapter.write_bytes(encode_edge_adapter(EdgeAdapter(file_sha256(fp32), (layer,))))
    out = device / "models" / "adapter-v1.int8.onnx"
    with pytest.raises(OtaError, match="calib"):
        apply_adapter(fp32, adapter, out)
    assert not out.parent.exists()
    shutil.copy2(base[1], calibration_path(fp32))
    assert apply_adapter(fp32, adapter, out).read_bytes() != base[2].read_bytes()


def _npy(x: npt.NDArray[np.generic]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        _npy(np.zeros((2, N_BANDS, N_FRAMES), np.float32)),  # float32, not float16
        _npy(np.zeros((2, N_BANDS, N_FRAMES - 1), np.float16)),
        _npy(np.zeros((0, N_BANDS, N_FRAMES), np.float16)),
        _npy(np.zeros((MAX_CALIBRATION_WINDOWS + 1, N_BANDS, N_FRAMES), np.float16)),
        _npy(np.full((1, N_BANDS, N_FRAMES), np.nan, np.float16)),
        _npy(np.asfortranarray(np.zeros((2, N_BANDS, N_FRAMES), np.float16))),
        _npy(np.array([{"a": 1}], dtype=object)),  # a pickle
        _npy(np.zeros((2, N_BANDS, N_FRAMES), np.float16))[:-2],  # truncated payload
        b"not a numpy file",
        b"\x93NUMPY" + b"\x00" * (MAX_CALIBRATION_BYTES + 1),
    ],
)
def test_malformed_calibration_files_are_rejected(data: bytes) -> None:
    with pytest.raises(CalibrationError):
        parse_calibration(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(0, 200), byte=st.integers(0, 255), cut=st.integers(0, 300))
def test_corrupted_calibration_bytes_raise_only_calibration_error(
    pos: int, byte: int, cut: int
) -> None:
    good = encode_calibration(np.zeros((1, N_BANDS, N_FRAMES), np.float32))
    data = bytearray(good)
    data[pos] = byte  # within the 128-byte header or the start of the payload
    blob = bytes(data[: len(data) - cut])
    try:
        x = parse_calibration(blob)
    except CalibrationError:
        return
    assert x.shape == (1, N_BANDS, N_FRAMES)


def test_calibration_round_trips_as_float16() -> None:
    x = _windows(3, seed=5)
    data = encode_calibration(x)
    assert len(data) < 3 * N_BANDS * N_FRAMES * 2 + 256
    assert np.array_equal(parse_calibration(data), x.astype(np.float16).astype(np.float32))
    assert hashlib.sha256(data).digest() == hashlib.sha256(encode_calibration(x)).digest()


@pytest.mark.parametrize("hi", [1e-3, 0.1, 0.7, 3.3, 17.25, 1234.5])
def test_ranges_round_outward_to_a_grid_that_absorbs_last_bit_differences(hi: float) -> None:
    r = round_range(hi)
    assert hi < r <= hi * (1 + 2**-4)
    assert round_range(r) == r and float(np.float32(r)) == r
    # a CPU whose max comes out a few ulps apart lands on the same grid point
    x = np.float32(hi)
    near = [x, *(np.nextafter(x, np.float32(s)) for s in (0.0, np.inf))]
    assert {round_range(float(v)) for v in near} == {r}
    assert round_range(1.0) == 1.0  # a value on the grid stays (the unlucky edge case)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_degenerate_ranges_fall_back_to_one(bad: float) -> None:
    assert round_range(bad) == 1.0
