"""Base model → LoRA adapter → edge conversion → on-device merge, end to end on CPU.

The demo target: a base trained on wail/yelp sirens mistakes two-tone (hilo) sirens for
horns; a LoRA adapter trained on a device's hilo sirens, converted to the edge format
and merged by the device into its own fp32 copy then re-quantized (static int8,
calibrated on the base's calibration set), recognises them without costing the other
classes. The format tests at the top need no training.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cloud_sidecar.config import LoraTarget, TrainConfig
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.lora import convert_for_edge, evaluate, load_with_adapter, train_adapter
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN, n_parameters
from cloud_sidecar.pretrain import BaseModel, load_base_model
from devstack.dataset import pretrain_synthetic
from devstack.scene.windows import build_training_set
from edge_daemon.errors import InferenceError, OtaError
from edge_daemon.inference.adapter import apply_adapter, merged_fp32_path
from edge_daemon.inference.backends import LiteRtBackendConfig, ModelFiles, make_classifier
from edge_daemon.inference.onnx_backend import OnnxClassifier
from fleet_model import RECIPE, calibration_path
from fleet_model.adapter import (
    ADAPTER_FORMAT,
    MAX_ADAPTER_BYTES,
    EdgeAdapter,
    LowRankLayer,
    encode_edge_adapter,
    parse_edge_adapter,
)
from fleet_model.errors import AdapterError
from fleet_model.tflite_patch import tflite_path
from fleet_protocol.features import FEATURE_VERSION, N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256
from fleet_protocol.labels import CLASS_INDEX, CLASSES

HILO_PAIRS = ((435.0, 580.0), (450.0, 600.0), (392.0, 523.0))
OTHER = tuple(c for c in CLASSES if c != "siren")
SHA = "ab" * 32
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _adapter(rank: int = 4) -> EdgeAdapter:
    rng = np.random.default_rng(0)
    conv = LowRankLayer(
        "conv2.weight",
        rng.standard_normal((rank, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((32, rank, 1, 1)).astype(np.float32),
        2.0,
    )
    lin = LowRankLayer(
        "fc2.weight",
        rng.standard_normal((rank, 64)).astype(np.float32),
        rng.standard_normal((10, rank)).astype(np.float32),
        1.0,
    )
    return EdgeAdapter(SHA, (conv, lin), {"rank": str(rank)})


# --------------------------------------------------------------------------- format (fast)


def test_edge_adapter_round_trips_through_its_byte_format() -> None:
    original = _adapter()
    parsed = parse_edge_adapter(encode_edge_adapter(original))
    assert parsed.base_model_sha256 == SHA and parsed.extra == {"rank": "4"}
    for a, b in zip(original.layers, parsed.layers, strict=True):
        assert a.initializer == b.initializer and a.scale == b.scale
        assert np.array_equal(a.a, b.a) and np.array_equal(a.b, b.b)


def test_conv_delta_equals_peft_conv_merge_formula() -> None:
    layer = _adapter().layers[0]
    a, b = torch.from_numpy(layer.a), torch.from_numpy(layer.b)
    # peft.tuners.lora.layer.Conv2d.get_delta_weight for 3x3 kernels:
    expected = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3) * 2.0
    assert np.allclose(layer.delta(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: replace(a, base_model_sha256="not-a-sha"),
        lambda a: replace(a, layers=(replace(a.layers[0], scale=float("inf")),)),
        lambda a: replace(a, layers=(replace(a.layers[0], a=a.layers[0].a * np.float32("nan")),)),
        lambda a: replace(a, layers=(replace(a.layers[0], b=a.layers[0].b[:, :2]),)),
        lambda a: replace(a, layers=(a.layers[0], a.layers[0])),
        lambda a: replace(a, layers=()),
    ],
)
def test_malformed_adapters_are_rejected_with_adapter_error(mutate: Any) -> None:
    with pytest.raises(AdapterError):
        parse_edge_adapter(encode_edge_adapter(mutate(_adapter())))


def test_wrong_format_tag_oversize_and_rank_above_cap_are_rejected() -> None:
    data = encode_edge_adapter(_adapter())
    with pytest.raises(AdapterError, match="format"):
        parse_edge_adapter(data.replace(ADAPTER_FORMAT.encode(), b"lora-lowrank-v9"))
    with pytest.raises(AdapterError, match="exceeds"):
        parse_edge_adapter(data + b" " * MAX_ADAPTER_BYTES)
    with pytest.raises(AdapterError, match="rank"):
        parse_edge_adapter(encode_edge_adapter(_adapter(rank=65)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(min_value=0), byte=st.integers(0, 255), cut=st.integers(min_value=0))
def test_corrupted_or_truncated_adapter_bytes_raise_only_adapter_error(
    pos: int, byte: int, cut: int
) -> None:
    data = bytearray(encode_edge_adapter(_adapter()))
    data[pos % len(data)] = byte
    blob = bytes(data[: len(data) - cut % 64])
    with contextlib.suppress(AdapterError):  # any other exception fails the test
        parse_edge_adapter(blob)


def test_merged_fp32_lives_next_to_the_int8_model() -> None:
    assert merged_fp32_path(Path("/m/cand.int8.onnx")) == Path("/m/cand.fp32.onnx")
    assert merged_fp32_path(Path("/m/model.onnx")) == Path("/m/model.fp32.onnx")


def test_model_is_small_and_has_no_batchnorm() -> None:
    model = AudioCNN(len(CLASSES))
    assert n_parameters(model) < 200_000
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    probs = model(torch.zeros(3, N_BANDS, N_FRAMES))
    assert probs.shape == (3, len(CLASSES))
    assert torch.allclose(probs.sum(dim=1), torch.ones(3))


# --------------------------------------------------------------------------- pipeline (slow)


def test_lora_targets_in_config_are_the_models_adaptable_layers() -> None:
    assert get_args(LoraTarget) == ADAPTABLE_LAYERS
    assert set(TrainConfig().targets) <= set(ADAPTABLE_LAYERS)
    for bad in ((), ("conv9",)):
        with pytest.raises(ValidationError):
            TrainConfig(targets=bad)


@dataclass(frozen=True)
class Pipeline:
    base: BaseModel
    pretrain_s: float
    lora_s: float
    adapter_dir: Path
    edge_adapter: Path
    adapted_int8: Path
    hilo: tuple[F32, I64]
    others: tuple[F32, I64]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("pipeline")
    t0 = time.monotonic()
    # 35 event segments of 1-4 s per class (~85 windows), written as WAV files and read back
    base = pretrain_synthetic(root / "base", seed=0, per_class=35, epochs=6)
    pretrain_s = time.monotonic() - t0
    rng = np.random.default_rng(7)
    hilo = build_training_set(rng, 60, ("hilo",), classes=("siren",), hilo_pairs=HILO_PAIRS)
    others = build_training_set(rng, 40, ("wail", "yelp"))
    # What one device heard: hilo sirens, a little of everything else; plus replay.
    rng = np.random.default_rng(11)
    xs, ys = build_training_set(rng, 150, ("hilo",), classes=("siren",), hilo_pairs=HILO_PAIRS)
    xn, yn = build_training_set(rng, 17, ("wail", "yelp"), classes=OTHER)
    replay = build_training_set(rng, 30, ("wail", "yelp"))
    t1 = time.monotonic()
    adapter_dir = train_adapter(
        base,
        np.concatenate([xs, xn]),
        np.concatenate([ys, yn]),
        replay=replay,
        out_dir=root / "adapter",
        rank=8,
        seed=0,
    )
    lora_s = time.monotonic() - t1
    edge = root / "edge-adapter.safetensors"
    edge.write_bytes(convert_for_edge(adapter_dir, base))
    int8 = apply_adapter(base.onnx_fp32, edge, root / "device" / "model.int8.onnx")
    return Pipeline(base, pretrain_s, lora_s, adapter_dir, edge, int8, hilo, others)


def _acc(model: Path, data: tuple[F32, I64]) -> float:
    return float(evaluate(None, *data, probs=OnnxClassifier(model).predict(data[0]))["accuracy"])


@pytest.mark.slow
def test_pretrain_meets_budget_and_held_out_accuracy(pipe: Pipeline) -> None:
    card = json.loads(pipe.base.card.read_text())
    print(f"\npretrain {pipe.pretrain_s:.1f} s, held-out {card['held_out']}")
    assert pipe.pretrain_s <= 90.0
    assert card["held_out"]["accuracy_int8"] >= 0.90
    assert card["classes"] == list(CLASSES) and card["feature_version"] == FEATURE_VERSION
    assert card["held_out"]["int8_fp32_agreement"] >= 0.99
    assert card["quantization"]["recipe"] == RECIPE
    base = pipe.base
    tflite = tflite_path(base.onnx_fp32)
    for path in (base.state_dict, base.onnx_fp32, base.onnx_int8, base.calibration, tflite):
        assert card["sha256"][path.name] == file_sha256(path)
    assert base.calibration == calibration_path(base.onnx_fp32)
    assert pipe.base.sha256_fp32 == file_sha256(pipe.base.onnx_fp32)


@pytest.mark.slow
def test_exported_graph_has_the_contract_io_and_named_weight_initializers(pipe: Pipeline) -> None:
    graph = onnx.load(str(pipe.base.onnx_fp32)).graph
    assert [i.name for i in graph.input] == ["features"]
    assert [o.name for o in graph.output] == ["probs"]
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    names = {t.name for t in graph.initializer}
    assert {f"{layer}.weight" for layer in ADAPTABLE_LAYERS} <= names
    clf = OnnxClassifier(pipe.base.onnx_int8)
    for batch in (1, 5):
        probs = clf.predict(np.zeros((batch, N_BANDS, N_FRAMES), np.float32))
        assert probs.shape == (batch, len(CLASSES))
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_tampered_base_directory_is_refused(pipe: Pipeline, tmp_path: Path) -> None:
    assert load_base_model(pipe.base.dir) == pipe.base
    for name in (pipe.base.onnx_int8.name, pipe.base.calibration.name, "base.fp32.tflite"):
        copy = tmp_path / name
        shutil.copytree(pipe.base.dir, copy)
        (copy / name).write_bytes(b"\0" * 16)
        with pytest.raises(TrainingError):
            load_base_model(copy)


@pytest.mark.slow
def test_base_of_another_feature_version_is_refused(pipe: Pipeline, tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(pipe.base.dir, copy)
    card = json.loads((copy / pipe.base.card.name).read_text())
    card["feature_version"] = "logmel-v1"
    (copy / pipe.base.card.name).write_text(json.dumps(card))
    with pytest.raises(TrainingError, match="'logmel-v1' features"):
        load_base_model(copy)


@pytest.mark.slow
def test_base_model_mistakes_hilo_sirens_for_something_else(pipe: Pipeline) -> None:
    probs = OnnxClassifier(pipe.base.onnx_int8).predict(pipe.hilo[0])
    acc = float((probs.argmax(axis=1) == CLASS_INDEX["siren"]).mean())
    horn = float((probs.argmax(axis=1) == CLASS_INDEX["horn"]).mean())
    print(f"\nbase int8 on hilo: siren {acc:.3f}, horn {horn:.3f}")
    assert acc <= 0.30


@pytest.mark.slow
def test_adapter_is_peft_format_and_converts_to_a_small_edge_artifact(pipe: Pipeline) -> None:
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in pipe.adapter_dir.iterdir()
    }
    print(f"\nLoRA training {pipe.lora_s:.1f} s; edge adapter {pipe.edge_adapter.stat().st_size} B")
    assert pipe.lora_s <= 60.0
    adapter = parse_edge_adapter(pipe.edge_adapter.read_bytes())
    assert adapter.base_model_sha256 == pipe.base.sha256_fp32
    assert {x.initializer for x in adapter.layers} == {f"{n}.weight" for n in ADAPTABLE_LAYERS}
    assert pipe.edge_adapter.stat().st_size < pipe.base.onnx_fp32.stat().st_size / 4


@pytest.mark.slow
def test_merged_onnx_equals_the_peft_torch_model(pipe: Pipeline) -> None:
    x = pipe.others[0][:64]
    with torch.no_grad():
        expected = load_with_adapter(pipe.base, pipe.adapter_dir)(torch.from_numpy(x)).numpy()
    merged = OnnxClassifier(merged_fp32_path(pipe.adapted_int8)).predict(x)
    diff = float(np.abs(merged - expected).max())
    print(f"\nmerged fp32 vs PEFT max |diff| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_adapted_int8_recognises_hilo_without_losing_other_classes(pipe: Pipeline) -> None:
    hilo_base, hilo_new = _acc(pipe.base.onnx_int8, pipe.hilo), _acc(pipe.adapted_int8, pipe.hilo)
    x, y = pipe.others
    keep = y != CLASS_INDEX["siren"]
    non_siren = (x[keep], y[keep])
    other_base, other_new = _acc(pipe.base.onnx_int8, non_siren), _acc(pipe.adapted_int8, non_siren)
    all_base, all_new = _acc(pipe.base.onnx_int8, pipe.others), _acc(pipe.adapted_int8, pipe.others)
    print(
        f"\nhilo: base {hilo_base:.3f} -> adapted {hilo_new:.3f};"
        f" other classes {other_base:.3f} -> {other_new:.3f};"
        f" base distribution (wail/yelp incl.) {all_base:.3f} -> {all_new:.3f}"
    )
    assert hilo_new >= 0.85
    assert other_new >= other_base - 0.02
    assert all_new >= all_base - 0.02


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_top1_for_base_and_adapted_models(pipe: Pipeline) -> None:
    x = np.concatenate([pipe.others[0], pipe.hilo[0]])  # like the calibration windows
    pairs = {
        "base": (pipe.base.onnx_fp32, pipe.base.onnx_int8),
        "adapted": (merged_fp32_path(pipe.adapted_int8), pipe.adapted_int8),
    }
    rates = {}
    for name, (fp32, int8) in pairs.items():
        top32 = OnnxClassifier(fp32).predict(x).argmax(axis=1)
        top8 = OnnxClassifier(int8).predict(x).argmax(axis=1)
        rates[name] = float((top32 == top8).mean())
    print(f"\nint8/fp32 top-1 agreement on {len(x)} windows: {rates}")
    assert min(rates.values()) >= 0.99


@pytest.mark.slow
def test_litert_runs_the_trained_base_and_adapter_to_1e_4_of_onnxruntime_fp32(
    pipe: Pipeline,
) -> None:
    x = np.concatenate([pipe.others[0][:48], pipe.hilo[0][:16]])
    merged = ModelFiles(merged_fp32_path(pipe.adapted_int8), pipe.adapted_int8, pipe.base.onnx_fp32)
    base = ModelFiles(pipe.base.onnx_fp32, pipe.base.onnx_int8)
    diffs = {}
    for name, files in (("base", base), ("adapted", merged)):
        lite = make_classifier(LiteRtBackendConfig(), files, merged=files is merged)
        want = OnnxClassifier(files.fp32).predict(x)
        diffs[name] = float(np.abs(lite.predict(x) - want).max())
    print(f"\nLiteRT vs onnxruntime fp32 max |diff|: {diffs}")
    assert max(diffs.values()) <= 1e-4


@pytest.mark.slow
def test_device_merge_is_deterministic_so_the_cloud_can_predict_its_hash(
    pipe: Pipeline, tmp_path: Path
) -> None:
    again = apply_adapter(pipe.base.onnx_fp32, pipe.edge_adapter, tmp_path / "again.int8.onnx")
    assert file_sha256(again) == file_sha256(pipe.adapted_int8)


@pytest.mark.slow
def test_adapter_for_another_base_is_refused_and_nothing_is_written(
    pipe: Pipeline, tmp_path: Path
) -> None:
    other_base = tmp_path / "other.fp32.onnx"
    model = onnx.load(str(pipe.base.onnx_fp32))
    model.doc_string = "another base"
    onnx.save(model, str(other_base))
    with pytest.raises(OtaError, match="base"):
        apply_adapter(other_base, pipe.edge_adapter, tmp_path / "out" / "m.int8.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_onnx_classifier_reports_hash_and_rejects_bad_input(pipe: Pipeline, tmp_path: Path) -> None:
    clf = OnnxClassifier(pipe.adapted_int8, intra_op_threads=1)
    assert clf.model_sha256 == file_sha256(pipe.adapted_int8)
    assert clf.predict(np.zeros((0, N_BANDS, N_FRAMES), np.float32)).shape == (0, len(CLASSES))
    with pytest.raises(InferenceError):
        clf.predict(np.zeros((2, N_BANDS, N_FRAMES - 1), np.float32))
    with pytest.raises(InferenceError):
        OnnxClassifier(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InferenceError):
        OnnxClassifier(tmp_path / "junk.onnx")
