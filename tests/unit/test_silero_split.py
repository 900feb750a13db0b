"""The split Silero model (batched encoder + numpy decoder) against the shipped graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from devstack.scene import sounds, speech
from edge_daemon.errors import InferenceError
from edge_daemon.privacy.silero import ENCODE_BATCH, SileroModel
from edge_daemon.privacy.vad import CHUNK_SAMPLES, CONTEXT_SAMPLES, default_model_path


@pytest.fixture(scope="module")
def model() -> SileroModel:
    path = default_model_path()
    return SileroModel(path.read_bytes(), path)


def test_split_model_matches_the_shipped_graph_chunk_by_chunk(
    model: SileroModel, tmp_path: Path
) -> None:
    clip = speech.speech_clip("it", np.random.default_rng(1), tmp_path)
    bed = sounds.background(clip.size, np.random.default_rng(1))
    streams = np.stack([0.5 * clip + bed, bed, 0.05 * clip]).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    full = ort.InferenceSession(str(default_model_path()), opts, providers=["CPUExecutionProvider"])
    n = streams.shape[1] // CHUNK_SAMPLES
    state = np.zeros((2, 3, 128), dtype=np.float32)
    context = np.zeros((3, CONTEXT_SAMPLES), dtype=np.float32)
    inputs, want = [], []
    for i in range(n):
        chunk = streams[:, i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES]
        x = np.concatenate((context, chunk), axis=1)
        prob, state = full.run(None, {"input": x, "state": state, "sr": np.array(16000)})
        inputs.append(x)
        want.append(np.asarray(prob).reshape(3))
        context = chunk[:, -CONTEXT_SAMPLES:]
    gates = model.encode(np.concatenate(inputs)).reshape(n, 3, -1)
    split_state = np.zeros((2, 3, 128), dtype=np.float32)
    got = []
    for g in gates:
        p, split_state = model.step(g, split_state)
        got.append(p)
    assert max(float(np.max(w)) for w in want) > 0.9  # the clip is heard
    assert np.allclose(np.array(got), np.array(want), atol=1e-5)
    assert np.allclose(split_state, state, atol=1e-5)


def test_encoder_rows_do_not_depend_on_how_chunks_are_grouped(model: SileroModel) -> None:
    x = np.random.default_rng(0).standard_normal((3 * ENCODE_BATCH + 3, 576)).astype(np.float32)
    whole = model.encode(x)
    pieces = np.concatenate([model.encode(x[i : i + 5]) for i in range(0, x.shape[0], 5)])
    assert np.array_equal(whole, pieces)


def test_a_graph_without_the_silero_layout_is_refused(tmp_path: Path) -> None:
    node = helper.make_node("Identity", ["input"], ["output"])
    graph = helper.make_graph(
        [node],
        "not_silero",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 576])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 576])],
    )
    data = helper.make_model(graph).SerializeToString()
    with pytest.raises(InferenceError, match="sr == 16000"):
        SileroModel(data, tmp_path / "fake.onnx")
    with pytest.raises(InferenceError, match="cannot parse"):
        SileroModel(b"\x00garbage", tmp_path / "garbage.onnx")
