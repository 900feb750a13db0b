"""The base's .tflite: converted once by TensorFlow (cloud), patched on the device.

``cloud_sidecar.export_tflite`` converts an untrained ``AudioCNN`` the way pretraining
does (TensorFlow in a child process); ``fleet_model.tflite_patch`` finds every weight in
the result and overwrites the adapted ones. These tests need ``tensorflow-cpu``
(requirements/lock.txt): without it the export raises ``TrainingError`` and they fail;
they never skip. TensorFlow must never load into this process (see the last test).
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import cloud_sidecar.export_tflite as export
from cloud_sidecar.errors import TrainingError
from fleet_model.adapter import merge_into
from fleet_model.errors import TfliteError
from fleet_model.int8 import calibration_path
from fleet_model.tflite_patch import MAX_TFLITE_BYTES, patch_weights, tflite_path, weight_slots
from tests.unit.model_files import random_windows, untrained_base

F32 = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto, bytes]:
    d = tmp_path_factory.mktemp("tflite")
    fp32, _, _ = untrained_base(d, random_windows(8))
    path, sha = export.export_tflite(fp32)
    data = path.read_bytes()
    assert path == tflite_path(fp32) == d / "base.fp32.tflite"
    assert len(sha) == 64
    return fp32, onnx.load(str(fp32)), data


def _scaled(model: onnx.ModelProto, names: set[str], factor: float) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    for t in out.graph.initializer:
        if t.name in names:
            arr = numpy_helper.to_array(t) * np.float32(factor)
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), t.name))
    return out


def _export(model: onnx.ModelProto, d: Path) -> bytes:
    fp32 = d / "m.fp32.onnx"
    onnx.save(model, str(fp32))
    path, _ = export.export_tflite(fp32)
    return path.read_bytes()


def test_conversion_is_deterministic(
    converted: tuple[Path, onnx.ModelProto, bytes], tmp_path: Path
) -> None:
    fp32, _, data = converted
    shutil.copy(fp32, tmp_path / fp32.name)
    shutil.copy(calibration_path(fp32), calibration_path(tmp_path / fp32.name))
    path, _ = export.export_tflite(tmp_path / fp32.name)
    assert path.read_bytes() == data


def test_every_initializer_has_one_slot_in_the_converter_layouts(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    _, model, data = converted
    slots = weight_slots(data, model)
    names = {t.name for t in model.graph.initializer}
    assert set(slots) == names  # weights and biases alike
    assert len({s.buffer for s in slots.values()}) == len(slots)
    for layer in ("conv1", "conv2", "conv3", "conv4"):
        assert slots[f"{layer}.weight"].perm == (0, 2, 3, 1)  # OIHW -> OHWI
    assert slots["fc1.weight"].perm == slots["fc2.weight"].perm == (0, 1)  # (out, in)


def test_patch_of_a_merge_writes_only_the_changed_buffers_and_keeps_the_layout(
    converted: tuple[Path, onnx.ModelProto, bytes], tmp_path: Path
) -> None:
    _, model, data = converted
    assert patch_weights(data, model, model) == data
    merged = _scaled(model, {"conv2.weight", "fc1.weight"}, 1.25)
    out = patch_weights(data, model, merged)
    assert len(out) == len(data) and out != data
    changed = np.flatnonzero(np.frombuffer(out, np.uint8) != np.frombuffer(data, np.uint8))
    sizes = {"conv2.weight": 32 * 16 * 9 * 4, "fc1.weight": 64 * 512 * 4}
    assert 0 < changed.size <= sum(sizes.values())
    # the merged .tflite is the same as converting the merged model from scratch
    assert weight_slots(out, merged).keys() == weight_slots(data, model).keys()
    x = random_windows(4, seed=5)
    scratch = _export(merged, tmp_path)
    assert np.array_equal(export.litert_probs(out, x), export.litert_probs(scratch, x))


def test_patched_tflite_matches_onnxruntime_on_the_merged_model(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    from fleet_model.adapter import EdgeAdapter, LowRankLayer

    _, model, data = converted
    rng = np.random.default_rng(2)
    layer = LowRankLayer(
        "conv3.weight",
        rng.standard_normal((4, 32, 3, 3)).astype(np.float32),
        rng.standard_normal((64, 4, 1, 1)).astype(np.float32),
        0.05,
    )
    merged = merge_into(copy.deepcopy(model), EdgeAdapter("0" * 64, (layer,)))
    assert export.check_tflite(patch_weights(data, model, merged), merged) <= export.TOLERANCE


def test_a_changed_initializer_without_a_slot_is_refused(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    _, model, data = converted
    base = _scaled(model, {"conv1.bias"}, 3.0)  # its values are in no buffer now
    assert "conv1.bias" not in weight_slots(data, base)
    assert patch_weights(data, base, base) == data  # unchanged: nothing to write
    with pytest.raises(TfliteError, match=r"conv1\.bias changed"):
        patch_weights(data, base, _scaled(base, {"conv1.bias"}, 2.0))


def test_a_tflite_of_another_model_or_another_graph_is_refused(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    _, model, data = converted
    other = _scaled(model, {"conv4.weight"}, 0.5)
    with pytest.raises(TfliteError, match=r"conv4\.weight"):
        patch_weights(data, other, other)
    extra = copy.deepcopy(model)
    extra.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "extra"))
    with pytest.raises(TfliteError, match="initializers differ"):
        patch_weights(data, model, extra)


def test_bytes_that_are_not_a_tflite_or_too_large_are_refused(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    _, model, _ = converted
    for bad in (b"", b"TFL3", b"\0" * 64, b"x" * (MAX_TFLITE_BYTES + 1)):
        with pytest.raises(TfliteError):
            patch_weights(bad, model, model)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(-4096, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_corrupted_tflite_is_patched_or_refused_with_tflite_error_only(
    converted: tuple[Path, onnx.ModelProto, bytes], flips: list[tuple[int, int]]
) -> None:
    _, model, data = converted
    bad = bytearray(data)
    for pos, value in flips:
        bad[pos] = value  # the first or last 4 KiB: the tables, around the weights
    try:
        out = patch_weights(bytes(bad), model, model)
    except TfliteError:
        return
    assert out == bytes(bad)  # nothing changed in the model, so nothing is written


def test_export_refuses_a_graph_that_is_not_audiocnn_and_writes_nothing(
    converted: tuple[Path, onnx.ModelProto, bytes], tmp_path: Path
) -> None:
    _, model, _ = converted
    broken = copy.deepcopy(model)
    keep = [t for t in broken.graph.initializer if t.name != "conv4.weight"]
    del broken.graph.initializer[:]
    broken.graph.initializer.extend(keep)
    with pytest.raises(TrainingError, match="conv4"):
        _export(broken, tmp_path)
    assert not tflite_path(tmp_path / "m.fp32.onnx").exists()
    fp32 = tmp_path / "n.fp32.onnx"
    onnx.save(model, str(fp32))
    with pytest.raises(TrainingError, match="differs from onnxruntime"):
        export.export_tflite(fp32, tolerance=-1.0)  # no agreement is good enough
    assert not tflite_path(fp32).exists()


def test_tensorflow_never_loads_into_the_exporting_process(
    converted: tuple[Path, onnx.ModelProto, bytes],
) -> None:
    # TensorFlow exports BoringSSL's EVP_* globally: SoftHSM's C_Login, later in the same
    # process (the sidecar, the integration tests), would call them and crash
    assert converted[2]
    assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")]
