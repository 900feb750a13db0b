"""The base model's .tflite for LiteRT devices, converted once in the cloud by TensorFlow.

Owns ``export_tflite``: ``base.fp32.onnx`` -> ``base.fp32.tflite`` beside it
(``fleet_model.tflite_patch.tflite_path``), converted by TensorFlow's maintained
``tf.lite.TFLiteConverter`` from a ``tf.function`` that rebuilds ``AudioCNN.logits``
in NHWC from the ONNX model's own initializers and node attributes (ADR 0011). Devices
never convert: they patch adapter-merged weights into this file
(``fleet_model.tflite_patch.patch_weights``). Also a command for a base directory made
before this existed: ``python -m cloud_sidecar.export_tflite DIR/base.fp32.onnx``.

Invariants:

- TensorFlow runs in a child process only (``export_tflite`` starts
  ``python -m cloud_sidecar.export_tflite``), never in the caller's: its
  ``libtensorflow_framework.so`` exports BoringSSL's ``EVP_*`` symbols globally, and a
  library loaded after it that links OpenSSL (SoftHSM's ``C_Login`` in the same process)
  then calls them and crashes. Never on the device either: ``edge_daemon`` forbids it
  in pyproject's import rules;
- the weights come from the ONNX initializers bit for bit (only transposed), so every
  weight of the ONNX model has one buffer in the .tflite that ``patch_weights`` finds;
  this is checked before anything is written;
- the .tflite is checked against onnxruntime on the same ONNX model (LiteRT; random
  windows and the calibration set beside the model; max |difference| of the
  probabilities <= ``TOLERANCE``) before it is written; any failure is a
  ``TrainingError`` and leaves no file;
- the graph is AudioCNN's (``cloud_sidecar.model``): a strided conv, three conv blocks
  with two 2x2 max pools, a mean over time, two linear layers, softmax; conv strides
  and pads and pool sizes are read from the ONNX nodes. A changed architecture fails the
  check above and must be rebuilt here too.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from cloud_sidecar.errors import TrainingError
from fleet_model import ModelError, calibration_path, parse_calibration
from fleet_model.int8 import MAX_CALIBRATION_BYTES, MAX_MODEL_BYTES
from fleet_model.tflite_patch import patch_weights, tflite_path
from fleet_protocol.io.files import file_sha256, write_atomic

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
CHECK_WINDOWS = 16
_LAYERS = ("conv1", "conv2", "conv3", "conv4", "fc1", "fc2")  # AudioCNN's, in order
TIMEOUT_S = 600.0  # the child takes 7-8 s on a shared 2-core box (TensorFlow's import)
F32 = npt.NDArray[np.float32]


def _tensorflow() -> Any:
    """TensorFlow, imported on first use, with its C++ info logs off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise TrainingError(
            "the .tflite export needs tensorflow-cpu (requirements/lock.txt, the cloud extra)"
        ) from exc
    return tf


def _conv_attrs(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Conv attributes keyed by the weight initializer's name."""
    return {
        n.input[1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "Conv"
    }


def _convert(model: onnx.ModelProto) -> bytes:
    """The TFLite bytes of the AudioCNN ONNX ``model``, by ``tf.lite.TFLiteConverter``.

    Loads TensorFlow into *this* process: only the child of ``export_tflite`` calls it.
    """
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = _conv_attrs(model)
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    needed = [f"{layer}.{p}" for layer in _LAYERS for p in ("weight", "bias")]
    missing = [n for n in needed if n not in w]
    plain = all(convs.get(f"{c}.weight", {"group": 0}).get("group", 1) == 1 for c in _LAYERS[:4])
    if missing or not plain or not pools or len(dims) != 3:
        raise TrainingError(
            f".tflite export: not the AudioCNN graph (missing {missing}, plain convs {plain},"
            f" {len(pools)} max pools, input rank {len(dims)})"
        )
    try:
        pool = {a.name: helper.get_attribute_value(a) for a in pools[0].attribute}
        k, s = list(pool["kernel_shape"]), list(pool.get("strides", pool["kernel_shape"]))
        n_mels, n_frames = int(dims[1]), int(dims[2])
    except (KeyError, ValueError) as exc:
        raise TrainingError(f".tflite export: not the AudioCNN graph: {exc}") from exc
    tf = _tensorflow()  # after every check that needs no TensorFlow

    def conv(x: Any, layer: str) -> Any:
        attrs = convs[f"{layer}.weight"]
        pt, pl, pb, pr = (int(v) for v in attrs.get("pads", [0, 0, 0, 0]))
        sh, sw = (int(v) for v in attrs.get("strides", [1, 1]))
        x = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])
        filt = tf.constant(w[f"{layer}.weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
        x = tf.nn.conv2d(x, filt, strides=[1, sh, sw, 1], padding="VALID")
        return tf.nn.relu(tf.nn.bias_add(x, tf.constant(w[f"{layer}.bias"])))

    def pool2d(x: Any) -> Any:
        return tf.nn.max_pool2d(x, k, s, "VALID")

    def dense(x: Any, layer: str) -> Any:
        return tf.matmul(x, tf.constant(w[f"{layer}.weight"].T)) + w[f"{layer}.bias"]

    def probs(features: Any) -> Any:
        x = conv(tf.expand_dims(features, -1), "conv1")  # NHWC throughout
        x = pool2d(conv(x, "conv2"))
        x = pool2d(conv(x, "conv3"))
        x = conv(x, "conv4")
        x = tf.transpose(tf.reduce_mean(x, axis=2), [0, 2, 1])  # (B, C, H), as torch
        x = tf.reshape(x, [-1, x.shape[1] * x.shape[2]])
        return {"probs": tf.nn.softmax(dense(tf.nn.relu(dense(x, "fc1")), "fc2"))}

    fn = tf.function(probs, input_signature=[tf.TensorSpec([None, n_mels, n_frames], tf.float32)])
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function()], fn
        )
        data: bytes = converter.convert()
    except Exception as exc:  # TensorFlow raises ConverterError, ValueError, ...
        raise TrainingError(f".tflite export: TensorFlow could not convert: {exc}") from exc
    return data


def litert_probs(data: bytes, x: F32) -> F32:
    """Run the .tflite ``data`` on ``x`` with LiteRT (one thread)."""
    from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]

    it = Interpreter(model_content=data, num_threads=1)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    it.resize_tensor_input(inp, list(x.shape), strict=False)
    it.allocate_tensors()
    it.set_tensor(inp, x)
    it.invoke()
    return np.array(it.get_tensor(out), dtype=np.float32)


def check_tflite(
    data: bytes,
    model: onnx.ModelProto,
    windows: F32 | None = None,
    *,
    tolerance: float = TOLERANCE,
) -> float:
    """Max |LiteRT - onnxruntime| of the probabilities; ``TrainingError`` past ``tolerance``
    or when ``fleet_model.tflite_patch`` cannot find every weight in ``data``."""
    import onnxruntime as ort

    try:
        if patch_weights(data, model, model) != data:
            raise TrainingError(".tflite export: patching the unchanged weights changed bytes")
    except ModelError as exc:
        raise TrainingError(f".tflite export: devices could not patch it: {exc}") from exc
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((CHECK_WINDOWS, dims[1], dims[2])) * 3.0).astype(np.float32)
    if windows is not None:
        x = np.concatenate([x, windows.astype(np.float32)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    want = np.asarray(sess.run(None, {model.graph.input[0].name: x})[0], dtype=np.float32)
    diff = float(np.max(np.abs(litert_probs(data, x) - want)))
    if not diff <= tolerance:
        raise TrainingError(f".tflite export: LiteRT differs from onnxruntime by {diff:.2e}")
    return diff


def export_tflite(
    fp32: Path, *, tolerance: float = TOLERANCE, timeout_s: float = TIMEOUT_S
) -> tuple[Path, str]:
    """Convert the fp32 ONNX model at ``fp32`` in a child process, check it and write
    ``tflite_path(fp32)`` atomically; return that path and its sha256.

    ``TrainingError`` (and no file) if TensorFlow is missing, the graph is not AudioCNN's,
    or the check fails; the message carries the child's last error lines.
    """
    argv = [sys.executable, "-m", __name__, str(fp32), "--tolerance", repr(tolerance)]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, stdin=None
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrainingError(f".tflite export of {fp32} did not finish: {exc}") from exc
    if out.returncode != 0:
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        ours = [x.removeprefix("TrainingError: ") for x in lines if x.startswith("TrainingError:")]
        why = ours[-1] if ours else " | ".join(lines[-3:])
        raise TrainingError(f".tflite export of {fp32} failed (exit {out.returncode}): {why}")
    path = tflite_path(fp32)
    return path, file_sha256(path)


def _read_capped(path: Path, cap: int) -> bytes:
    size = path.stat().st_size
    if size > cap:
        raise OSError(f"{path}: {size} bytes exceeds {cap}")
    return path.read_bytes()


def _export_here(fp32: Path, tolerance: float) -> Path:
    """The child's work: convert, check (on the calibration set too, if present), write."""
    calib = calibration_path(fp32)
    try:
        model = onnx.load_from_string(_read_capped(fp32, MAX_MODEL_BYTES))
        windows = (
            parse_calibration(_read_capped(calib, MAX_CALIBRATION_BYTES))
            if calib.is_file()
            else None
        )
    except (OSError, ModelError) as exc:
        raise TrainingError(f"cannot read {fp32} or its calibration set: {exc}") from exc
    except Exception as exc:  # protobuf DecodeError and friends
        raise TrainingError(f"cannot parse the ONNX model {fp32}: {exc}") from exc
    data = _convert(model)
    diff = check_tflite(data, model, windows, tolerance=tolerance)
    out = tflite_path(fp32)
    write_atomic(out, data, 0o644)
    log.info("wrote %s (%d bytes, max |LiteRT - onnxruntime| %.1e)", out, len(data), diff)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m cloud_sidecar.export_tflite FP32``: write the .tflite beside it."""
    ap = argparse.ArgumentParser(prog="python -m cloud_sidecar.export_tflite")
    ap.add_argument("fp32", type=Path, help="the base fp32 ONNX model (base.fp32.onnx)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(_export_here(args.fp32, args.tolerance))
    except TrainingError as exc:
        print("TrainingError: " + " ".join(str(exc).split())[:2000], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
