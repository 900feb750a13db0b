"""The ``lora-lowrank-v1`` edge adapter: its format, and merging it into a base model.

Owns the byte format the cloud ships (``encode_edge_adapter``/``parse_edge_adapter``)
and the merge both sides run (``merge_into``, ``merge_and_quantize``): add
``scale * (B @ A)`` to each named initializer of the fp32 base model, then quantize the
result exactly as pretraining did (``fleet_model.int8.quantize_model``: static QDQ
calibrated on the base model's own calibration set). The device merges into its own
copy of the base (the base is never downloaded again); the cloud runs the same merge
to judge the exact int8 model a device will build. Invariants:

- an adapter applies only to the base whose fp32 sha256 it names (else ``AdapterError``);
- every untrusted input is capped (``MAX_ADAPTER_BYTES``, ``MAX_HEADER_BYTES``,
  ``MAX_RANK``, ``MAX_LAYERS``, ``MAX_MODEL_BYTES``) and every tensor is checked for
  dtype, shape against the initializer it targets, and finiteness;
- bytes in, bytes out: the merged fp32 keeps the base's graph and metadata (only the
  targeted initializers' values change, so it still names the base's calibration set);
  callers write the results;
- numpy, onnx, onnxruntime and safetensors only: no torch.

Format: a safetensors file; for every adapted layer ``<initializer>.lora_A``
(``(r, in)`` or conv ``(r, in, kh, kw)``) and ``<initializer>.lora_B`` (``(out, r)``
or conv ``(out, r, 1, 1)``), float32; metadata ``format``, ``base_model_sha256`` and
``layers`` (JSON list of ``{"initializer": name, "scale": alpha / r}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from fleet_model.errors import AdapterError
from fleet_model.int8 import MAX_CALIBRATION_BYTES, MAX_MODEL_BYTES, quantize_model

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "lora-lowrank-v1"
MAX_ADAPTER_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 256 * 1024
MAX_RANK = 64
MAX_LAYERS = 64
MAX_SCALE = 1024.0

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LowRankLayer:
    """One adapted weight: ``W + scale * (B @ A)`` (conv: over the flattened kernel)."""

    initializer: str
    a: F32
    b: F32
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> F32:
        """The weight update, in the torch layout of the target weight."""
        if self.a.ndim == 4:  # conv: B (out, r, 1, 1), A (r, in, kh, kw)
            d = np.einsum("or,rikl->oikl", self.b[:, :, 0, 0], self.a)
        else:
            d = self.b @ self.a
        return np.asarray(d * np.float32(self.scale), dtype=np.float32)


@dataclass(frozen=True)
class EdgeAdapter:
    base_model_sha256: str
    layers: tuple[LowRankLayer, ...]
    extra: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- format


def encode_edge_adapter(adapter: EdgeAdapter) -> bytes:
    """Serialise to the ``lora-lowrank-v1`` safetensors bytes (the cloud's side)."""
    from safetensors.numpy import save

    tensors: dict[str, F32] = {}
    for layer in adapter.layers:
        tensors[f"{layer.initializer}.lora_A"] = np.ascontiguousarray(layer.a, dtype=np.float32)
        tensors[f"{layer.initializer}.lora_B"] = np.ascontiguousarray(layer.b, dtype=np.float32)
    meta = dict(adapter.extra)
    meta.update(
        format=ADAPTER_FORMAT,
        base_model_sha256=adapter.base_model_sha256,
        layers=json.dumps(
            [{"initializer": x.initializer, "scale": x.scale} for x in adapter.layers]
        ),
    )
    data: bytes = save(tensors, metadata=meta)
    return data


def _header(data: bytes) -> dict[str, object]:
    if len(data) < 8:
        raise AdapterError("edge adapter: truncated header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise AdapterError(f"edge adapter: header length {n} out of bounds")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"edge adapter: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterError("edge adapter: header is not an object")
    return header


def parse_edge_adapter(data: bytes) -> EdgeAdapter:
    """Parse and check untrusted adapter bytes; raises ``AdapterError`` on anything off."""
    if len(data) > MAX_ADAPTER_BYTES:
        raise AdapterError(f"edge adapter: {len(data)} bytes exceeds {MAX_ADAPTER_BYTES}")
    meta = _header(data).get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError("edge adapter: missing or malformed metadata")
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"edge adapter: format {meta.get('format')!r}, expected {ADAPTER_FORMAT}"
        )
    base_sha = meta.get("base_model_sha256", "")
    if len(base_sha) != 64 or any(c not in "0123456789abcdef" for c in base_sha):
        raise AdapterError("edge adapter: base_model_sha256 is not a sha256 hex digest")
    try:
        specs = json.loads(meta.get("layers", ""))
    except ValueError as exc:
        raise AdapterError(f"edge adapter: layers metadata is not JSON: {exc}") from exc
    if not isinstance(specs, list) or not 0 < len(specs) <= MAX_LAYERS:
        raise AdapterError(f"edge adapter: expected 1..{MAX_LAYERS} layers")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise AdapterError(f"edge adapter: unreadable tensors: {exc}") from exc
    layers: list[LowRankLayer] = []
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, dict):
            raise AdapterError("edge adapter: layer entry is not an object")
        name, scale = spec.get("initializer"), spec.get("scale")
        if not isinstance(name, str) or name in seen or not 0 < len(name) <= 256:
            raise AdapterError(f"edge adapter: bad or duplicate initializer name {name!r}")
        if not isinstance(scale, int | float) or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise AdapterError(f"edge adapter: bad scale {scale!r} for {name}")
        seen.add(name)
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"edge adapter: factors missing for {name}")
        layers.append(_checked_layer(name, a, b, float(scale)))
    extra_keys = set(tensors) - {f"{n}.lora_{x}" for n in seen for x in "AB"}
    if extra_keys:
        raise AdapterError(f"edge adapter: unexpected tensors {sorted(extra_keys)[:3]}")
    extra = {k: v for k, v in meta.items() if k not in ("format", "base_model_sha256", "layers")}
    return EdgeAdapter(base_sha, tuple(layers), extra)


def _checked_layer(name: str, a: F32, b: F32, scale: float) -> LowRankLayer:
    if a.dtype != np.float32 or b.dtype != np.float32:
        raise AdapterError(f"edge adapter: {name} factors must be float32")
    r = a.shape[0] if a.ndim else 0
    if not 0 < r <= MAX_RANK:
        raise AdapterError(f"edge adapter: {name} rank {r} outside 1..{MAX_RANK}")
    conv_ok = a.ndim == 4 and b.ndim == 4 and b.shape[1:] == (r, 1, 1)
    linear_ok = a.ndim == 2 and b.ndim == 2 and b.shape[1] == r
    if not (conv_ok or linear_ok):
        raise AdapterError(f"edge adapter: {name} factor shapes {a.shape} / {b.shape} do not pair")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise AdapterError(f"edge adapter: {name} has non-finite values")
    return LowRankLayer(name, a, b, scale)


# --------------------------------------------------------------------------- merge


def merge_into(model: onnx.ModelProto, adapter: EdgeAdapter) -> onnx.ModelProto:
    """Add every layer's delta to its initializer in ``model`` (modified in place)."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for layer in adapter.layers:
        tensor = inits.get(layer.initializer)
        if tensor is None:
            raise AdapterError(f"edge adapter targets {layer.initializer!r}, not in the base model")
        w = numpy_helper.to_array(tensor)
        delta = layer.delta()
        if delta.ndim == 2 and _stored_transposed(consumers.get(layer.initializer, [])):
            delta = delta.T
        if w.dtype != np.float32 or w.shape != delta.shape:
            raise AdapterError(
                f"edge adapter: {layer.initializer} is {w.dtype}{w.shape}, delta {delta.shape}"
            )
        merged = numpy_helper.from_array((w + delta).astype(np.float32), layer.initializer)
        tensor.CopyFrom(merged)
        log.debug("merged rank-%d delta into %s", layer.rank, layer.initializer)
    return model


def _stored_transposed(nodes: list[onnx.NodeProto]) -> bool:
    """True when a linear weight is stored (in, out): MatMul, or Gemm without transB."""
    for node in nodes:
        if node.op_type == "MatMul":
            return True
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return trans_b == 0
    return False


@dataclass(frozen=True)
class MergedModel:
    """The result of merging an adapter: the merged fp32 graph and its int8 form."""

    fp32: bytes
    int8: bytes
    base_model_sha256: str
    n_layers: int


def merge_and_quantize(base_fp32: bytes, adapter: bytes, calibration: bytes) -> MergedModel:
    """Merge untrusted ``adapter`` bytes into ``base_fp32`` and quantize with ``calibration``.

    Raises ``AdapterError`` if the adapter is malformed, names another base model or
    does not fit the base's initializers, ``CalibrationError`` if the calibration set is
    not the base's, ``QuantizationError`` if the merged graph cannot be quantized.
    """
    parsed = parse_edge_adapter(adapter)
    if len(base_fp32) > MAX_MODEL_BYTES:
        raise AdapterError(f"base model: {len(base_fp32)} bytes exceeds {MAX_MODEL_BYTES}")
    if len(calibration) > MAX_CALIBRATION_BYTES:
        raise AdapterError(f"calibration: {len(calibration)} bytes exceeds {MAX_CALIBRATION_BYTES}")
    base_sha = hashlib.sha256(base_fp32).hexdigest()
    if parsed.base_model_sha256 != base_sha:
        raise AdapterError(
            f"adapter is for base {parsed.base_model_sha256[:12]}, this base is {base_sha[:12]}"
        )
    try:
        model = onnx.load_from_string(base_fp32)
    except Exception as exc:  # protobuf DecodeError and friends
        raise AdapterError(f"cannot parse the base model: {exc}") from exc
    merge_into(model, parsed)
    int8 = quantize_model(model, calibration)
    log.info("merged %d-layer adapter into base %s", len(parsed.layers), base_sha[:12])
    return MergedModel(model.SerializeToString(), int8, base_sha, len(parsed.layers))


__all__ = [
    "ADAPTER_FORMAT",
    "EdgeAdapter",
    "LowRankLayer",
    "MergedModel",
    "encode_edge_adapter",
    "merge_and_quantize",
    "merge_into",
    "parse_edge_adapter",
]
