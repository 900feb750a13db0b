"""Silero VAD split in two: a convolutional encoder batched over chunks, and its
recurrent decoder stepped in numpy.

Owns reading the packaged ``silero_vad.onnx`` (opset 16, v5/v6 layout: an ``If`` on the
sample rate whose 16 kHz branch is STFT → 4 conv blocks → LSTM cell (128) → ReLU →
1x1 conv → sigmoid), cutting the 16 kHz branch at the encoder output into an
onnxruntime session of its own, and the decoder's weights.

Why: the shipped graph runs one chunk per call, because the LSTM state of chunk ``t``
feeds chunk ``t + 1``; per call, onnxruntime's fixed cost (~100 nodes) dominates. Only
the LSTM is recurrent: the encoder of each 576-sample input (64 samples of context +
a 512-sample chunk) does not depend on any state, so all the chunks of a block go
through it as one batch, and the LSTM step (two 128x512 products) is cheap in numpy.

Invariants:
- ``encode`` then ``step`` computes what one run of the shipped model computes for the
  same input and state (checked against it to 1e-5 in ``tests/unit/test_silero_split``);
- the state layout is the shipped model's: ``(2, batch, 128)``, ``[0]`` = h, ``[1]`` = c;
- a model whose graph does not have this layout is refused with ``InferenceError``
  naming what is missing, never silently mis-split;
- no torch; numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edge_daemon.errors import InferenceError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
INPUT_SAMPLES = 576  # 64 context + 512 chunk
HIDDEN = 128
ENCODE_BATCH = 8  # rows per encoder run (fixed: see ``encode``)
ENCODER_OUT = "/encoder/3/activation/Relu_output_0"  # suffix of the 16 kHz branch's name
WEIGHTS = ("decoder.rnn.weight_ih", "decoder.rnn.weight_hh", "decoder.rnn.bias_ih",
           "decoder.rnn.bias_hh", "decoder.decoder.2.weight", "decoder.decoder.2.bias")  # fmt: skip

FloatArray = npt.NDArray[np.float32]


def _branch_16k(model: onnx.ModelProto) -> onnx.GraphProto:
    """The ``If`` branch taken when ``sr == 16000``."""
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute
    }
    for node in model.graph.node:
        if node.op_type != "Equal" or "sr" not in node.input:
            continue
        other = next(i for i in node.input if i != "sr")
        is_16k = int(np.asarray(consts.get(other, -1)).reshape(-1)[0]) == SAMPLE_RATE
        for n in model.graph.node:
            if n.op_type == "If" and node.output[0] in n.input:
                branches: dict[str, onnx.GraphProto] = {a.name: a.g for a in n.attribute}
                return branches["then_branch" if is_16k else "else_branch"]
    raise InferenceError("VAD model: no If on sr == 16000 (not a silero v5/v6 graph)")


def _constants(graph: onnx.GraphProto) -> dict[str, npt.NDArray[np.float32]]:
    out = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    out.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    return out


def _encoder_graph(model: onnx.ModelProto, branch: onnx.GraphProto) -> onnx.ModelProto:
    """A model ``input (N, 576) -> features (N, 128, 1)``: the branch up to the encoder."""
    out = next((o for n in branch.node for o in n.output if o.endswith(ENCODER_OUT)), None)
    if out is None:
        raise InferenceError(f"VAD model: no encoder output *{ENCODER_OUT}")
    producer = {o: n for n in branch.node for o in n.output}
    needed, todo = [], [out]
    seen: set[int] = set()
    while todo:  # every node the encoder output depends on
        name = todo.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        todo.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(branch.node)}
    nodes = sorted(needed, key=lambda n: order[id(n)])
    if any(i == "state" for n in nodes for i in n.input):
        raise InferenceError("VAD model: the encoder depends on the recurrent state")
    graph = helper.make_graph(
        nodes,
        "silero_encoder_16k",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", INPUT_SAMPLES])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        initializer=list(branch.initializer),
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


class SileroModel:
    """The loaded, split model. Stateless: callers keep the recurrent state."""

    def __init__(self, data: bytes, path: Path, threads: int = 1) -> None:
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:  # protobuf DecodeError and friends
            raise InferenceError(f"cannot parse VAD model {path}: {exc}") from exc
        branch = _branch_16k(model)
        consts = _constants(branch)
        found = {w: next((v for k, v in consts.items() if k.endswith(w)), None) for w in WEIGHTS}
        missing = [w for w, v in found.items() if v is None]
        if missing:
            raise InferenceError(f"VAD model {path}: no {', '.join(missing)}")
        w_ih, w_hh, b_ih, b_hh, w_out, b_out = (np.asarray(found[w], np.float32) for w in WEIGHTS)
        if w_ih.shape != (4 * HIDDEN, HIDDEN) or w_hh.shape != (4 * HIDDEN, HIDDEN):
            raise InferenceError(f"VAD model {path}: LSTM weights {w_ih.shape}, {w_hh.shape}")
        self._w_ih_t, self._w_hh_t = w_ih.T.copy(), w_hh.T.copy()
        self._bias = (b_ih + b_hh).astype(np.float32)
        self._w_out = w_out.reshape(HIDDEN).astype(np.float32)
        self._b_out = float(b_out.reshape(-1)[0])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self._encoder = ort.InferenceSession(
                _encoder_graph(model, branch).SerializeToString(),
                sess_options=opts,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"cannot load the VAD encoder of {path}: {exc}") from exc
        self._out = self._encoder.get_outputs()[0].name

    def encode(self, inputs: FloatArray) -> FloatArray:
        """``(N, 576)`` inputs (context + chunk) → ``(N, 4 * 128)`` LSTM input terms.

        Runs in batches of exactly ``ENCODE_BATCH`` rows (the last one zero-padded):
        onnxruntime's kernels, and so their rounding, depend on the batch shape, not on
        the other rows' values, so a row's result does not depend on how callers
        grouped the chunks.
        """
        n = inputs.shape[0]
        padded = np.zeros((-(-n // ENCODE_BATCH) * ENCODE_BATCH, INPUT_SAMPLES), np.float32)
        padded[:n] = inputs
        gates = np.empty((padded.shape[0], 4 * HIDDEN), dtype=np.float32)
        for i in range(0, padded.shape[0], ENCODE_BATCH):
            try:
                (out,) = self._encoder.run([self._out], {"input": padded[i : i + ENCODE_BATCH]})
            except Exception as exc:
                raise InferenceError(f"VAD encoder failed: {exc}") from exc
            feats = np.asarray(out, dtype=np.float32).reshape(ENCODE_BATCH, HIDDEN)
            gates[i : i + ENCODE_BATCH] = feats @ self._w_ih_t + self._bias  # input half
        return gates[:n]

    def step(self, gates_in: FloatArray, state: FloatArray) -> tuple[FloatArray, FloatArray]:
        """One LSTM step for a batch: ``(B, 512)`` from ``encode`` and state ``(2, B, 128)``
        → (speech probabilities ``(B,)``, new state)."""
        z = gates_in + state[0] @ self._w_hh_t
        s = _sigmoid(z)  # gates i, f, (g), o in PyTorch order; g takes tanh below
        c = s[:, HIDDEN : 2 * HIDDEN] * state[1] + s[:, :HIDDEN] * np.tanh(
            z[:, 2 * HIDDEN : 3 * HIDDEN]
        )
        h = s[:, 3 * HIDDEN :] * np.tanh(c)
        prob = _sigmoid(np.maximum(h, 0.0) @ self._w_out + self._b_out)
        return prob, np.stack((h, c))


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """1 / (1 + e^-x) without overflow: e^-|x| never exceeds 1."""
    e = np.exp(-np.abs(x))
    return np.asarray(np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), dtype=np.float32)
