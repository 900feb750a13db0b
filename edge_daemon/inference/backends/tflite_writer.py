"""Write a TFLite flatbuffer for our classifier straight from its fp32 ONNX graph.

Owns: translating the classifier's ONNX graph (the op set ``cloud_sidecar.model``
exports: Unsqueeze, Conv, Relu, MaxPool, ReduceMean, Flatten, Gemm, Softmax) into a
TFLite model, so LiteRT can run the base and every adapter-merged model without a
TensorFlow converter on the device (ADR 0011).

Invariants:
- the output takes ``features`` ``(batch, N_MELS, N_FRAMES)`` float32 and returns
  ``probs`` ``(batch, n_classes)``; batch is dynamic (shape signature ``-1``);
- activations are NHWC inside the TFLite graph; ONNX's NCHW semantics are kept by
  transposing filters to OHWI, by explicit PAD ops for ONNX's symmetric pads (TFLite
  SAME pads differently for strided convs), and by permuting the first Gemm's input
  columns when it follows a channel-major Flatten;
- any op, attribute or layout outside that set raises ``InferenceError`` naming it:
  an unsupported graph is refused, never translated approximately;
- weights are copied as float32, little-endian, 16-byte aligned; the result matches
  onnxruntime on the same fp32 model to ~1e-5 (tests/unit/test_backends.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import onnx
import tflite  # type: ignore[import-untyped]
from onnx import numpy_helper

from edge_daemon.errors import InferenceError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
_OP = tflite.BuiltinOperator
_OPT = tflite.BuiltinOptions
_RELU = tflite.ActivationFunctionType.RELU
_NONE = tflite.ActivationFunctionType.NONE
TFLITE_SCHEMA_VERSION = 3


@dataclass
class _Tensor:
    name: str
    shape: list[int]  # with 1 for the batch; signature has -1 there
    dtype: int = tflite.TensorType.FLOAT32
    data: bytes | None = None
    dynamic_batch: bool = True


@dataclass
class _Op:
    code: int
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: tuple[str, dict[str, object]] | None = None


@dataclass
class _Graph:
    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)

    def add(self, t: _Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, arr: npt.NDArray[np.generic], dtype: int) -> int:
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        return self.add(_Tensor(name, list(arr.shape), dtype, data, dynamic_batch=False))


def onnx_to_tflite(model: onnx.ModelProto) -> bytes:
    """The TFLite flatbuffer for ``model`` (see the module invariants)."""
    g = _Graph()
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts: dict[str, npt.NDArray[np.generic]] = {}
    nodes = list(model.graph.node)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    if len(model.graph.input) != 1:
        raise InferenceError("tflite export: the model must have exactly one input")
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 3 or not dims[1] or not dims[2]:
        raise InferenceError(f"tflite export: input must be (batch, mels, frames), got {dims}")
    # env: onnx tensor name -> (tflite tensor index, layout). Layouts: "plain" (same as
    # onnx), "nhwc" (onnx NCHW held as NHWC), "bhc" (onnx (B, C, H) held as (B, H, C))
    env: dict[str, tuple[int, str]] = {
        inp.name: (g.add(_Tensor(inp.name, [1, *dims[1:]])), "plain")
    }
    fused: set[str] = set()
    for n in nodes:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            continue
        if n.op_type == "Relu" and n.input[0] in fused:
            env[n.output[0]] = env[n.input[0]]
            continue
        relu_next = [c.op_type for c in consumers.get(n.output[0], [])] == ["Relu"]
        _translate(g, n, env, inits | consts, relu_next)
        if relu_next and n.op_type in ("Conv", "Gemm"):
            fused.add(n.output[0])
    if len(model.graph.output) != 1:
        raise InferenceError("tflite export: the model must have exactly one output")
    out_idx, layout = env[model.graph.output[0].name]
    if layout != "plain":
        raise InferenceError(f"tflite export: output left in {layout} layout")
    g.tensors[out_idx].name = model.graph.output[0].name
    return _serialize(g, [env[inp.name][0]], [out_idx])


def _attrs(n: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _translate(
    g: _Graph,
    n: onnx.NodeProto,
    env: dict[str, tuple[int, str]],
    consts: dict[str, npt.NDArray[np.generic]],
    relu_next: bool,
) -> None:
    a = _attrs(n)
    act = _RELU if relu_next else _NONE

    def src(i: int = 0) -> tuple[int, str, list[int]]:
        if n.input[i] not in env:
            raise InferenceError(f"tflite export: {n.op_type} input {n.input[i]!r} unknown")
        idx, layout = env[n.input[i]]
        return idx, layout, g.tensors[idx].shape

    def out(shape: list[int], layout: str) -> int:
        idx = g.add(_Tensor(n.output[0], shape))
        env[n.output[0]] = (idx, layout)
        return idx

    op = n.op_type
    if op == "Unsqueeze":
        x, layout, shape = src()
        axes = [int(v) for v in np.asarray(consts[n.input[1]]).ravel()]
        if axes != [1] or layout != "plain" or len(shape) != 3:
            raise InferenceError(f"tflite export: unsupported Unsqueeze {axes} of {shape}")
        # onnx (B, 1, H, W) NCHW == NHWC (B, H, W, 1): a reshape
        new = [shape[0], shape[1], shape[2], 1]
        y = out(new, "nhwc")
        s = g.const(
            n.output[0] + "/shape", np.array([-1, *new[1:]], np.int32), tflite.TensorType.INT32
        )
        g.ops.append(_Op(_OP.RESHAPE, [x, s], [y]))
    elif op == "Conv":
        x, layout, shape = src()
        w = np.asarray(consts[n.input[1]], np.float32)
        b = np.asarray(consts[n.input[2]], np.float32) if len(n.input) > 2 else None
        if layout != "nhwc" or a.get("group", 1) != 1 or w.ndim != 4:
            raise InferenceError(f"tflite export: unsupported Conv {n.name} ({layout}, {a})")
        if list(a.get("dilations", [1, 1])) != [1, 1] or a.get("auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            raise InferenceError(f"tflite export: unsupported Conv attributes {a}")
        pt, pl, pb, pr = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        sh, sw = [int(v) for v in a.get("strides", [1, 1])]
        kh, kw = w.shape[2], w.shape[3]
        if pt or pl or pb or pr:
            pads = np.array([[0, 0], [pt, pb], [pl, pr], [0, 0]], np.int32)
            pshape = [shape[0], shape[1] + pt + pb, shape[2] + pl + pr, shape[3]]
            p = g.add(_Tensor(n.output[0] + "/pad", pshape))
            pc = g.const(n.output[0] + "/pads", pads, tflite.TensorType.INT32)
            g.ops.append(_Op(_OP.PAD, [x, pc], [p], _OPT.PadOptions, ("PadOptions", {})))
            x, shape = p, pshape
        oh, ow = (shape[1] - kh) // sh + 1, (shape[2] - kw) // sw + 1
        wt = g.const(n.input[1], w.transpose(0, 2, 3, 1), tflite.TensorType.FLOAT32)
        bias = b if b is not None else np.zeros(w.shape[0], np.float32)
        bt = g.const(
            n.input[2] if b is not None else n.output[0] + "/bias", bias, tflite.TensorType.FLOAT32
        )
        y = out([shape[0], oh, ow, w.shape[0]], "nhwc")
        opts = {"Padding": tflite.Padding.VALID, "StrideH": sh, "StrideW": sw,
                "DilationHFactor": 1, "DilationWFactor": 1, "FusedActivationFunction": act}  # fmt: skip
        g.ops.append(
            _Op(_OP.CONV_2D, [x, wt, bt], [y], _OPT.Conv2DOptions, ("Conv2DOptions", opts))
        )
    elif op == "Relu":
        x, layout, shape = src()
        y = out(list(shape), layout)
        g.ops.append(_Op(_OP.RELU, [x], [y]))
    elif op == "MaxPool":
        x, layout, shape = src()
        kh, kw = [int(v) for v in a["kernel_shape"]]
        sh, sw = [int(v) for v in a.get("strides", [1, 1])]
        if layout != "nhwc" or any(a.get("pads", [0, 0, 0, 0])) or a.get("ceil_mode", 0):
            raise InferenceError(f"tflite export: unsupported MaxPool {a}")
        y = out([shape[0], (shape[1] - kh) // sh + 1, (shape[2] - kw) // sw + 1, shape[3]], "nhwc")
        opts = {"Padding": tflite.Padding.VALID, "StrideH": sh, "StrideW": sw,
                "FilterHeight": kh, "FilterWidth": kw, "FusedActivationFunction": _NONE}  # fmt: skip
        g.ops.append(_Op(_OP.MAX_POOL_2D, [x], [y], _OPT.Pool2DOptions, ("Pool2DOptions", opts)))
    elif op == "ReduceMean":
        x, layout, shape = src()
        raxes: Any = a.get("axes")
        if raxes is None and len(n.input) > 1:
            raxes = [int(v) for v in np.asarray(consts[n.input[1]]).ravel()]
        if layout != "nhwc" or list(raxes or []) != [3] or a.get("keepdims", 1) != 0:
            raise InferenceError(f"tflite export: unsupported ReduceMean {a}")
        # onnx axis 3 (W of NCHW) is axis 2 of NHWC; result (B, H, C) holds onnx (B, C, H)
        ax = g.const(n.output[0] + "/axes", np.array([2], np.int32), tflite.TensorType.INT32)
        y = out([shape[0], shape[1], shape[3]], "bhc")
        g.ops.append(
            _Op(
                _OP.MEAN, [x, ax], [y], _OPT.ReducerOptions, ("ReducerOptions", {"KeepDims": False})
            )
        )
    elif op == "Flatten":
        x, layout, shape = src()
        if a.get("axis", 1) != 1 or layout not in ("bhc", "plain"):
            raise InferenceError(f"tflite export: unsupported Flatten {a} of {layout}")
        flat = int(np.prod(shape[1:]))
        # "flat_bhc" remembers that features are in (H, C) order, not onnx's (C, H)
        y = out([shape[0], flat], f"flat_bhc:{shape[1]}:{shape[2]}" if layout == "bhc" else "plain")
        s = g.const(n.output[0] + "/shape", np.array([-1, flat], np.int32), tflite.TensorType.INT32)
        g.ops.append(_Op(_OP.RESHAPE, [x, s], [y]))
    elif op == "Gemm":
        x, layout, shape = src()
        w = np.asarray(consts[n.input[1]], np.float32)
        b = np.asarray(consts[n.input[2]], np.float32)
        if (
            a.get("transB", 0) != 1
            or a.get("transA", 0) != 0
            or a.get("alpha", 1.0) != 1.0
            or a.get("beta", 1.0) != 1.0
        ):
            raise InferenceError(f"tflite export: unsupported Gemm {a}")
        if layout.startswith("flat_bhc:"):
            h, c = (int(v) for v in layout.split(":")[1:])
            # tflite column h*C + c must read onnx column c*H + h
            w = w.reshape(w.shape[0], c, h).transpose(0, 2, 1).reshape(w.shape[0], h * c)
        elif layout != "plain":
            raise InferenceError(f"tflite export: Gemm on {layout} layout")
        wt = g.const(n.input[1], w, tflite.TensorType.FLOAT32)
        bt = g.const(n.input[2], b, tflite.TensorType.FLOAT32)
        y = out([shape[0], w.shape[0]], "plain")
        opts = {"FusedActivationFunction": act, "KeepNumDims": False}
        g.ops.append(
            _Op(
                _OP.FULLY_CONNECTED,
                [x, wt, bt],
                [y],
                _OPT.FullyConnectedOptions,
                ("FullyConnectedOptions", opts),
            )
        )
    elif op == "Softmax":
        x, layout, shape = src()
        if layout != "plain" or a.get("axis", -1) not in (-1, len(shape) - 1):
            raise InferenceError(f"tflite export: unsupported Softmax {a}")
        y = out(list(shape), "plain")
        g.ops.append(
            _Op(_OP.SOFTMAX, [x], [y], _OPT.SoftmaxOptions, ("SoftmaxOptions", {"Beta": 1.0}))
        )
    else:
        raise InferenceError(f"tflite export: ONNX op {op} is not supported")


def _int_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependInt32(int(v))
    return int(b.EndVector())


def _offsets_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return int(b.EndVector())


def _bytes_vector(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _options(b: flatbuffers.Builder, kind: str, fields: dict[str, object]) -> int:
    mod = importlib.import_module(f"tflite.{kind}")
    getattr(mod, f"{kind}Start")(b)
    for name, value in fields.items():
        getattr(mod, f"{kind}Add{name}")(b, value)
    return int(getattr(mod, f"{kind}End")(b))


def _serialize(g: _Graph, inputs: list[int], outputs: list[int]) -> bytes:
    b = flatbuffers.Builder(1024)
    codes = sorted({op.code for op in g.ops})
    # buffers: 0 is the empty sentinel; then one per constant tensor
    buffer_data: list[bytes] = [b""]
    tensor_buffer: list[int] = []
    for t in g.tensors:
        if t.data is None:
            tensor_buffer.append(0)
        else:
            buffer_data.append(t.data)
            tensor_buffer.append(len(buffer_data) - 1)
    buf_offsets = []
    for data in buffer_data:
        vec = _bytes_vector(b, data) if data else None
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buf_offsets.append(tflite.BufferEnd(b))
    tensor_offsets = []
    for t, buf in zip(g.tensors, tensor_buffer, strict=True):
        name = b.CreateString(t.name)
        shape = _int_vector(b, t.shape)
        sig = _int_vector(b, [-1, *t.shape[1:]] if t.dynamic_batch else t.shape)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddShapeSignature(b, sig)
        tflite.TensorAddType(b, t.dtype)
        tflite.TensorAddBuffer(b, buf)
        tflite.TensorAddName(b, name)
        tensor_offsets.append(tflite.TensorEnd(b))
    op_offsets = []
    for op in g.ops:
        ins, outs = _int_vector(b, op.inputs), _int_vector(b, op.outputs)
        opts = _options(b, *op.options) if op.options is not None else None
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op.code))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if opts is not None:
            tflite.OperatorAddBuiltinOptionsType(b, op.options_type)
            tflite.OperatorAddBuiltinOptions(b, opts)
        op_offsets.append(tflite.OperatorEnd(b))
    tensors_v = _offsets_vector(b, tensor_offsets)
    ops_v = _offsets_vector(b, op_offsets)
    in_v, out_v = _int_vector(b, inputs), _int_vector(b, outputs)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_v)
    tflite.SubGraphAddInputs(b, in_v)
    tflite.SubGraphAddOutputs(b, out_v)
    tflite.SubGraphAddOperators(b, ops_v)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)
    code_offsets = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))
    codes_v = _offsets_vector(b, code_offsets)
    subgraphs_v = _offsets_vector(b, [subgraph])
    buffers_v = _offsets_vector(b, buf_offsets)
    desc = b.CreateString("sovereign-edge classifier (written from ONNX)")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, codes_v)
    tflite.ModelAddSubgraphs(b, subgraphs_v)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_v)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())
