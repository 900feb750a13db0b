"""Inference backends as plugins: config union, onnxruntime, LiteRT and Hailo's errors.

The model is an untrained ``AudioCNN`` exported the way pretraining exports it (the
numbers do not matter, the graph does), and for LiteRT converted to .tflite as
pretraining converts it (TensorFlow; ``cloud_sidecar.export_tflite``). LiteRT runs here
(ai-edge-litert); Hailo has no library or HAT here, so its tests cover the errors an
operator would see.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import numpy_helper
from pydantic import ValidationError

from cloud_sidecar.export_tflite import export_tflite
from edge_daemon.config import ModelConfig
from edge_daemon.errors import BackendUnavailableError, InferenceError
from edge_daemon.inference.adapter import apply_adapter, merged_fp32_path
from edge_daemon.inference.backends import (
    HailoBackendConfig,
    LiteRtBackendConfig,
    ModelFiles,
    OnnxBackendConfig,
    make_classifier,
)
from edge_daemon.inference.onnx_backend import OnnxClassifier
from fleet_model.adapter import (
    EdgeAdapter,
    LowRankLayer,
    encode_edge_adapter,
)
from fleet_model.tflite_patch import tflite_path
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256
from tests.unit.model_files import untrained_base

F32 = npt.NDArray[np.float32]
TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    fp32, _, int8 = untrained_base(tmp_path_factory.mktemp("base"), _features(8, seed=99))
    return ModelFiles(fp32, int8)


def _features(n: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).standard_normal((n, N_BANDS, N_FRAMES)).astype(np.float32)


# ------------------------------------------------------------------------- config


def test_model_config_defaults_to_onnxruntime_int8_and_picks_plugins_by_type() -> None:
    m = ModelConfig(base_fp32=Path("a"), base_int8=Path("b"))
    assert m.backend == OnnxBackendConfig() and m.backend.precision == "int8"
    lite = ModelConfig.model_validate(
        {"base_fp32": "a", "base_int8": "b", "backend": {"type": "litert"}}
    )
    assert isinstance(lite.backend, LiteRtBackendConfig)
    hailo = ModelConfig.model_validate(
        {"base_fp32": "a", "base_int8": "b", "backend": {"type": "hailo", "hef": "m.hef"}}
    )
    assert isinstance(hailo.backend, HailoBackendConfig) and hailo.backend.hef == Path("m.hef")


@pytest.mark.parametrize(
    "backend",
    [{"type": "tpu"}, {"type": "hailo"}, {"type": "litert", "threads": 2}, {"precision": "int4"}],
)
def test_unknown_backend_type_missing_or_unknown_fields_are_refused(
    backend: dict[str, str],
) -> None:
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"base_fp32": "a", "base_int8": "b", "backend": backend})


# ------------------------------------------------------------------ onnxruntime


def test_onnx_backend_runs_the_int8_file_by_default_and_fp32_when_asked(base: ModelFiles) -> None:
    int8 = make_classifier(OnnxBackendConfig(), base)
    fp32 = make_classifier(OnnxBackendConfig(precision="fp32"), base)
    assert isinstance(int8, OnnxClassifier)
    assert int8.model_sha256 == file_sha256(base.int8)
    assert fp32.model_sha256 == file_sha256(base.fp32)
    assert int8.predict(_features(2)).shape == (2, 10)


# ------------------------------------------------------------------------ LiteRT


@pytest.fixture(scope="module")
def lite_base(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """The same untrained base with its .tflite beside it, as pretraining leaves it."""
    d = tmp_path_factory.mktemp("lite-base")
    fp32, _, int8 = untrained_base(d, _features(8, seed=99))
    export_tflite(fp32)
    return ModelFiles(fp32, int8)


def _adapter_on_every_layer(base_fp32: Path, seed: int = 1, rank: int = 4) -> EdgeAdapter:
    """Random low-rank factors for all six weights (conv filters and both linear layers)."""
    rng = np.random.default_rng(seed)
    layers = []
    for t in onnx.load(str(base_fp32)).graph.initializer:
        if not t.name.endswith(".weight"):
            continue
        shape = tuple(t.dims)
        if len(shape) == 4:  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
            a = rng.standard_normal((rank, *shape[1:]))
            b = rng.standard_normal((shape[0], rank, 1, 1))
        else:  # linear (out, in): A (r, in), B (out, r)
            a, b = rng.standard_normal((rank, shape[1])), rng.standard_normal((shape[0], rank))
        scale = 0.3 / float(np.sqrt(np.prod(shape[1:])))
        layers.append(LowRankLayer(t.name, a.astype(np.float32), b.astype(np.float32), scale))
    return EdgeAdapter(file_sha256(base_fp32), tuple(layers), {"rank": str(rank)})


def test_litert_matches_onnxruntime_fp32_to_1e_4_at_several_batch_sizes(
    lite_base: ModelFiles,
) -> None:
    ref = OnnxClassifier(lite_base.fp32)
    lite = make_classifier(LiteRtBackendConfig(), lite_base)
    assert lite.n_classes == ref.n_classes == 10
    assert lite.model_sha256 == file_sha256(tflite_path(lite_base.fp32))  # nothing to patch
    for n in (1, 7, 1, 32):  # resizes up, down and up again
        x = _features(n, seed=n)
        got, want = lite.predict(x), ref.predict(x)
        assert got.shape == want.shape == (n, 10)
        assert float(np.max(np.abs(got - want))) <= TOL
    assert lite.predict(np.zeros((0, N_BANDS, N_FRAMES), np.float32)).shape == (0, 10)


def test_litert_runs_an_adapter_on_every_layer_to_1e_4_of_onnxruntime_on_the_merged_fp32(
    lite_base: ModelFiles, tmp_path: Path
) -> None:
    path = tmp_path / "a.adapter"
    path.write_bytes(encode_edge_adapter(_adapter_on_every_layer(lite_base.fp32)))
    int8 = apply_adapter(lite_base.fp32, path, tmp_path / "models" / "adapter-v1.int8.onnx")
    merged = ModelFiles(merged_fp32_path(int8), int8, base_fp32=lite_base.fp32)
    assert not tflite_path(merged.fp32).exists()  # no converter ran: the base's file is patched
    lite = make_classifier(LiteRtBackendConfig(), merged, merged=True)
    x = _features(16, seed=3) * 2.0
    want = OnnxClassifier(merged.fp32).predict(x)
    assert float(np.max(np.abs(lite.predict(x) - want))) <= TOL
    base_lite = make_classifier(LiteRtBackendConfig(), lite_base)
    assert float(np.max(np.abs(base_lite.predict(x) - want))) > 1e-3  # the adapter mattered
    assert lite.model_sha256 != base_lite.model_sha256
    again = make_classifier(LiteRtBackendConfig(), merged, merged=True)
    assert again.model_sha256 == lite.model_sha256  # deterministic, so the cloud can predict it


def test_litert_without_the_base_tflite_names_the_file_and_the_alternative(
    base: ModelFiles,
) -> None:
    with pytest.raises(InferenceError, match=r"base\.fp32\.tflite") as exc:
        make_classifier(LiteRtBackendConfig(), base)
    assert "onnxruntime" in str(exc.value)


def test_litert_refuses_a_tflite_converted_from_another_base(
    base: ModelFiles, lite_base: ModelFiles, tmp_path: Path
) -> None:
    fp32 = tmp_path / "base.fp32.onnx"
    shutil.copy(base.fp32, fp32)  # same architecture, other weights (not seed 0's copy)
    model = onnx.load(str(fp32))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name))
    onnx.save(model, str(fp32))
    shutil.copy(tflite_path(lite_base.fp32), tflite_path(fp32))
    with pytest.raises(InferenceError, match="does not hold the base model's weights"):
        make_classifier(LiteRtBackendConfig(), ModelFiles(fp32, base.int8))


def test_litert_rejects_wrong_feature_shapes_with_inference_error(lite_base: ModelFiles) -> None:
    lite = make_classifier(LiteRtBackendConfig(), lite_base)
    with pytest.raises(InferenceError, match="expected"):
        lite.predict(np.zeros((1, N_BANDS, N_FRAMES - 1), np.float32))


def test_litert_reports_an_unreadable_model_as_inference_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.fp32.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(InferenceError, match="cannot parse"):
        make_classifier(LiteRtBackendConfig(), ModelFiles(bad, bad))


# ------------------------------------------------------------------------- Hailo


def test_hailo_without_hailort_names_the_missing_library(
    base: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hailo_platform", None)  # import fails, as here
    with pytest.raises(BackendUnavailableError, match="HailoRT Python library") as exc:
        make_classifier(HailoBackendConfig(hef=Path("base.hef")), base)
    assert "hailo_platform" in str(exc.value) and "onnxruntime" in str(exc.value)


def test_hailo_with_library_but_no_device_names_the_hat(
    base: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("hailo_platform")
    fake.Device = types.SimpleNamespace(scan=lambda: [])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hailo_platform", fake)
    with pytest.raises(BackendUnavailableError, match="no Hailo device") as exc:
        make_classifier(HailoBackendConfig(hef=Path("base.hef")), base)
    assert "AI HAT" in str(exc.value)


def test_hailo_refuses_an_adapter_merged_model_before_touching_the_device(
    base: ModelFiles,
) -> None:
    with pytest.raises(InferenceError, match="adapter cannot be merged into a HEF"):
        make_classifier(HailoBackendConfig(hef=Path("base.hef")), base, merged=True)
