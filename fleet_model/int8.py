"""The int8 recipe: static QDQ quantization of the classifier, calibrated on fixed windows.

Owns ``quantize_model`` (the one function that pretraining and the device both run, so
that the cloud can predict the int8 model a device builds), the calibration-set format
(``<base>.calib.npy`` beside the base fp32; ``calibration_path`` names it) and the QDQ
rewrite. Bytes in, bytes out: the callers read and write the files. Invariants:

- deterministic: the same fp32 bytes and the same calibration file give the same int8
  bytes. Activation ranges come from one single-threaded fp32 onnxruntime run over the
  calibration windows and are rounded *outward* to 5 significant bits, so last-bit
  differences between CPUs (NEON vs AVX-512 kernels) do not change the result except
  when a range lies within float noise of a grid point; weights are quantized in numpy;
- what is quantized: ``QUANT_LAYERS`` (conv2..conv4, ~97% of the multiply-adds) get
  per-output-channel symmetric int8 weights, int32 biases and uint8 activations with
  zero point 0 (every one follows a ReLU, which the uint8 clamp then implements), and
  the max pools between them stay in uint8. conv1 and the head (fc1, fc2, softmax)
  stay fp32: measured, conv1 (one input channel) is slower in int8, and an int8 head
  was no faster and agreed less often with fp32 (ADR 0012);
- the fp32 model passed in is not modified (every fp32 initializer the adapter merges
  into keeps its name and bytes there); the int8 model holds no fp32 copy of a
  quantized weight;
- the calibration file is untrusted input: capped, checked for dtype,
  shape, count and finiteness, and its sha256 must equal the one the fp32 model names
  in its metadata (``CALIBRATION_SHA_KEY``, set at export), so the base model's hash,
  which every adapter names, pins the calibration set too;
- numpy, onnx and onnxruntime only: no torch.

Calibration file: a ``.npy`` (no pickle) of float16 upload-feature windows ``(n, N_BANDS,
N_FRAMES)``, ``1 <= n <= MAX_CALIBRATION_WINDOWS``, made by pretraining from its own
synthetic training scenes (no city data).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

from fleet_model.errors import CalibrationError, QuantizationError
from fleet_protocol.features import N_BANDS, N_FRAMES

log = logging.getLogger(__name__)

QUANT_LAYERS = ("conv2", "conv3", "conv4")
RECIPE = "qdq-static-v1"  # recorded in the int8 model's metadata; bump on any change
CALIBRATION_SHA_KEY = "int8_calibration_sha256"
RECIPE_KEY = "int8_recipe"
CALIBRATION_SUFFIX = ".calib.npy"
MAX_CALIBRATION_WINDOWS = 256
MAX_CALIBRATION_BYTES = 8 * 1024 * 1024
MAX_MODEL_BYTES = 64 * 1024 * 1024
RANGE_BITS = 5  # significant bits kept when an activation range is rounded outward
INT32_MAX = 2**31 - 1

F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------- calibration set


def calibration_path(base_fp32: Path) -> Path:
    """The calibration set beside a base fp32 model: ``base.fp32.onnx`` → ``base.calib.npy``."""
    name = base_fp32.name
    stem = name[: -len(".fp32.onnx")] if name.endswith(".fp32.onnx") else base_fp32.stem
    return base_fp32.with_name(stem + CALIBRATION_SUFFIX)


def encode_calibration(windows: npt.NDArray[np.floating]) -> bytes:
    """The calibration file's bytes for ``(n, N_BANDS, N_FRAMES)`` windows (stored float16)."""
    x = np.asarray(windows)
    if x.ndim != 3 or x.shape[1:] != (N_BANDS, N_FRAMES):
        raise ValueError(f"calibration windows must be (n, {N_BANDS}, {N_FRAMES}), got {x.shape}")
    if not 0 < len(x) <= MAX_CALIBRATION_WINDOWS:
        raise ValueError(f"1..{MAX_CALIBRATION_WINDOWS} calibration windows, got {len(x)}")
    half = np.ascontiguousarray(x, dtype="<f2")
    if not np.isfinite(half).all():
        raise ValueError("calibration windows must be finite in float16")
    buf = io.BytesIO()
    np.save(buf, half, allow_pickle=False)
    return buf.getvalue()


def parse_calibration(data: bytes) -> F32:
    """Untrusted calibration bytes → float32 windows; ``CalibrationError`` on anything off.

    The ``.npy`` header is checked (dtype, order, shape, count) before any payload is
    touched, and the payload must have exactly the size the header announces.
    """
    if len(data) > MAX_CALIBRATION_BYTES:
        raise CalibrationError(
            f"calibration set: {len(data)} bytes exceeds {MAX_CALIBRATION_BYTES}"
        )
    f = io.BytesIO(data)
    try:
        if npy_format.read_magic(f) != (1, 0):  # what np.save writes for this shape
            raise ValueError("not .npy format version 1.0")
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(f, max_header_size=1024)
    except Exception as exc:  # numpy's header parser raises tokenize/ast errors too
        raise CalibrationError(f"calibration set is not a .npy array: {exc}") from exc
    if dtype != np.dtype("<f2") or fortran_order:
        raise CalibrationError(f"calibration set must be C-order float16, not {dtype}")
    if len(shape) != 3 or tuple(shape[1:]) != (N_BANDS, N_FRAMES):
        raise CalibrationError(f"calibration set has shape {shape}, not (n, {N_BANDS}, {N_FRAMES})")
    n = int(shape[0])
    if not 0 < n <= MAX_CALIBRATION_WINDOWS:
        raise CalibrationError(f"calibration set has {n} windows, not 1..{MAX_CALIBRATION_WINDOWS}")
    payload = data[f.tell() :]
    if len(payload) != n * N_BANDS * N_FRAMES * 2:
        raise CalibrationError(
            f"calibration set payload is {len(payload)} bytes, header says {n} windows"
        )
    x = np.frombuffer(payload, dtype="<f2").reshape(n, N_BANDS, N_FRAMES).astype(np.float32)
    if not np.isfinite(x).all():
        raise CalibrationError("calibration set has non-finite values")
    return x


def set_calibration_sha(model: onnx.ModelProto, sha256_hex: str) -> None:
    """Record in ``model``'s metadata which calibration set quantizes it (at export)."""
    props = [p for p in model.metadata_props if p.key != CALIBRATION_SHA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=CALIBRATION_SHA_KEY, value=sha256_hex)


def _meta(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


# --------------------------------------------------------------------------- ranges


def round_range(hi: float) -> float:
    """``hi`` rounded up to ``RANGE_BITS`` significant bits (exact in float32); 1.0 if ≤ 0."""
    if not hi > 0.0 or not math.isfinite(hi):
        return 1.0
    _, exp = math.frexp(hi)  # hi = m * 2**exp, 0.5 <= m < 1
    step = math.ldexp(1.0, exp - RANGE_BITS)
    return math.ceil(hi / step) * step


def activation_ranges(model: onnx.ModelProto, names: list[str], windows: F32) -> dict[str, float]:
    """Max of each named fp32 tensor over ``windows`` (one single-threaded run), rounded up."""
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    outs = sess.run(names, {sess.get_inputs()[0].name: windows})
    return {n: round_range(float(np.max(v))) for n, v in zip(names, outs, strict=True)}


# ------------------------------------------------------------------------ QDQ rewrite


def _plan(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, str]]:
    """The quantized convs by weight name, and each one's fused ReLU output by conv output."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convs: dict[str, onnx.NodeProto] = {}
    relu_of: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        layer = node.input[1].removesuffix(".weight")
        if layer not in QUANT_LAYERS:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu":
            raise QuantizationError(f"int8: {layer} is not followed by exactly one ReLU")
        convs[node.input[1]] = node
        relu_of[node.output[0]] = after[0].output[0]
    missing = sorted(set(QUANT_LAYERS) - {w.removesuffix(".weight") for w in convs})
    if missing:
        raise QuantizationError(f"int8: layers {missing} not found as Conv nodes")
    return convs, relu_of


def _dequantize(tensor: str) -> onnx.NodeProto:
    """``<tensor>_dequantized`` from ``<tensor>_quantized``, ``_scale`` and ``_zero_point``
    (per channel along axis 0)."""
    return helper.make_node(
        "DequantizeLinear",
        [f"{tensor}_quantized", f"{tensor}_scale", f"{tensor}_zero_point"],
        [f"{tensor}_dequantized"],
        name=f"{tensor}_DequantizeLinear",
        axis=0,
    )


def _weight_qdq(
    w: F32, b: F32 | None, x_scale: np.float32, name: str
) -> tuple[list[TensorProto], list[onnx.NodeProto], list[str]]:
    """Per-output-channel symmetric int8 weight and int32 bias, with their DequantizeLinear."""
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    w_scale = np.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    wq = np.clip(np.rint(w / w_scale.reshape(shape)), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, f"{name}.weight_quantized"),
        numpy_helper.from_array(w_scale, f"{name}.weight_scale"),
        numpy_helper.from_array(
            np.zeros_like(wq, shape=w_scale.shape), f"{name}.weight_zero_point"
        ),
    ]
    nodes = [_dequantize(f"{name}.weight")]
    outs = [f"{name}.weight_dequantized"]
    if b is not None:
        b_scale = (w_scale * x_scale).astype(np.float32)
        bq = np.rint(b.astype(np.float64) / b_scale.astype(np.float64))
        if np.abs(bq).max(initial=0.0) > INT32_MAX:
            raise QuantizationError(f"int8: {name} bias does not fit int32 at its scale")
        inits += [
            numpy_helper.from_array(bq.astype(np.int32), f"{name}.bias_quantized"),
            numpy_helper.from_array(b_scale, f"{name}.bias_scale"),
            numpy_helper.from_array(np.zeros(b_scale.shape, np.int32), f"{name}.bias_zero_point"),
        ]
        nodes.append(_dequantize(f"{name}.bias"))
        outs.append(f"{name}.bias_dequantized")
    return inits, nodes, outs


def _act_qdq(name: str, scale: np.float32) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    """QuantizeLinear → DequantizeLinear on activation ``name`` (uint8, zero point 0)."""
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), f"{name}_zero_point"),
    ]
    q, dq = f"{name}_quantized", f"{name}_dequantized"
    nodes = [
        helper.make_node(
            "QuantizeLinear",
            [name, f"{name}_scale", f"{name}_zero_point"],
            [q],
            name=f"{name}_QuantizeLinear",
        ),
        helper.make_node(
            "DequantizeLinear",
            [q, f"{name}_scale", f"{name}_zero_point"],
            [dq],
            name=f"{name}_DequantizeLinear",
        ),
    ]
    return inits, nodes


def to_qdq(model: onnx.ModelProto, ranges: dict[str, float]) -> onnx.ModelProto:
    """A QDQ copy of ``model`` with ``QUANT_LAYERS`` in int8; ``ranges``: tensor → max."""
    out = copy.deepcopy(model)
    g = out.graph
    convs, relu_of = _plan(g)
    inits = {t.name: t for t in g.initializer}
    scales: dict[str, np.float32] = {}  # activation tensor -> uint8 scale (zero point 0)
    for conv in convs.values():
        for name in (conv.input[0], relu_of[conv.output[0]]):
            if name not in ranges:
                raise QuantizationError(f"int8: no calibrated range for {name}")
            scales[name] = np.float32(ranges[name] / 255.0)
    drop_relu = {relu_of[c.output[0]] for c in convs.values()}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    dropped: set[str] = set()

    def dequantized(name: str) -> str:
        return f"{name}_dequantized" if name in scales else name

    for node in g.node:
        if node.op_type == "Relu" and node.output[0] in drop_relu:
            continue  # the uint8 clamp at zero point 0 is the ReLU
        if node.op_type == "MaxPool" and node.input[0] in scales:
            scales[node.output[0]] = scales[node.input[0]]  # max commutes with quantization
        new = copy.deepcopy(node)
        new.input[:] = [dequantized(i) for i in node.input]
        if node.input[1:2] and node.input[1] in convs:
            layer = node.input[1].removesuffix(".weight")
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            b = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else None
            x_scale = scales[node.input[0]]
            w_inits, w_nodes, w_outs = _weight_qdq(w, b, x_scale, layer)
            new_inits += w_inits
            nodes += w_nodes
            new.input[1:] = w_outs
            dropped.update(node.input[1:])
            new.output[0] = relu_of[node.output[0]]
        nodes.append(new)
        for produced in new.output:
            if produced in scales:
                a_inits, a_nodes = _act_qdq(produced, scales[produced])
                new_inits += a_inits
                nodes += a_nodes
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    out.metadata_props.add(key=RECIPE_KEY, value=RECIPE)
    return out


# ------------------------------------------------------------------------- the recipe


def quantize_model(model: onnx.ModelProto, calibration: bytes) -> bytes:
    """The int8 model's bytes for fp32 ``model`` and calibration-file bytes; writes nothing.

    Raises ``CalibrationError`` if the calibration set is malformed or is not the one
    ``model`` names, ``QuantizationError`` if the graph is not the classifier this
    recipe knows.
    """
    want, got = _meta(model, CALIBRATION_SHA_KEY), hashlib.sha256(calibration).hexdigest()
    if want != got:
        raise CalibrationError(
            f"calibration set {got[:12]} is not the one the model names ({want})"
        )
    windows = parse_calibration(calibration)
    convs, relu_of = _plan(model.graph)
    names = sorted({c.input[0] for c in convs.values()} | set(relu_of.values()))
    try:
        ranges = activation_ranges(model, names, windows)
        data: bytes = to_qdq(model, ranges).SerializeToString()
    except QuantizationError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise QuantizationError(f"int8 quantization failed: {exc}") from exc
    log.debug("int8 activation ranges %s", ranges)
    return data
