"""Adapter-merged weights into the base's converted .tflite, by patching its buffers.

Owns ``tflite_path`` (``<base>.fp32.tflite`` beside the base fp32 ONNX, where the
cloud's converter writes it and LiteRT devices look for it), ``weight_slots`` (which
flatbuffer buffer holds which ONNX initializer) and ``patch_weights`` (the .tflite of
an adapter-merged model). A merge changes weight values only, never the graph, so the
device gets a merged .tflite by overwriting those buffers in a copy of the base's
bytes: no converter, no TensorFlow on the device (ADR 0011). Invariants:

- the mapping is derived, not declared: an initializer's slot is the one float32
  buffer whose shape and bytes equal the initializer in a layout the converter uses
  (as is; conv filters OIHW -> OHWI; a matrix transposed). Names in the .tflite are
  the converter's and are not relied on;
- the .tflite must hold every weight (float32 initializer of two or more dimensions)
  of the base ONNX in exactly one buffer of its own, else ``TfliteError``: a .tflite
  converted from another base, or a converter that folded a weight into something
  else, is refused, never patched approximately;
- only initializers whose bytes differ between base and merged are written; each must
  have a slot (so a bias the converter fused away may change only if it has one);
- the result has the base's length and layout: only buffer contents change; it is
  deterministic (same inputs, same bytes);
- bytes in, bytes out (numpy, onnx, the ``tflite`` schema bindings); every read is
  capped at ``MAX_TFLITE_BYTES``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import tflite  # type: ignore[import-untyped]
from onnx import numpy_helper

from fleet_model.errors import TfliteError

log = logging.getLogger(__name__)

MAX_TFLITE_BYTES = 64 * 1024 * 1024
TFLITE_SUFFIX = ".tflite"
_FLOAT32 = tflite.TensorType.FLOAT32
# ONNX -> TFLite layouts a converter may store a weight in, by rank (axes permutations)
_LAYOUTS: dict[int, tuple[tuple[int, ...], ...]] = {4: ((0, 2, 3, 1),), 2: ((0, 1), (1, 0))}


def tflite_path(base_fp32: Path) -> Path:
    """Where the base's .tflite lives: ``base.fp32.onnx`` -> ``base.fp32.tflite``."""
    return base_fp32.with_suffix(TFLITE_SUFFIX)


@dataclass(frozen=True)
class WeightSlot:
    """Where one ONNX initializer lives in the .tflite: a buffer, in a layout."""

    buffer: int
    perm: tuple[int, ...]  # np.transpose axes taking the ONNX array to the stored one


def _model(data: bytes | bytearray) -> tflite.Model:
    if len(data) > MAX_TFLITE_BYTES:
        raise TfliteError(f".tflite: {len(data)} bytes exceeds {MAX_TFLITE_BYTES}")
    if len(data) < 8 or not tflite.Model.ModelBufferHasIdentifier(data, 0):
        raise TfliteError(".tflite: not a TFLite flatbuffer (no TFL3 identifier)")
    return tflite.Model.GetRootAs(data, 0)


# what reading a corrupt flatbuffer raises (offsets and lengths out of bounds)
_CORRUPT = (IndexError, ValueError, TypeError, OverflowError, struct.error)


def _float_buffers(m: tflite.Model) -> dict[tuple[int, ...], dict[int, bytes]]:
    """Shape -> {buffer index: bytes} of the float32 constant tensors with that shape."""
    out: dict[tuple[int, ...], dict[int, bytes]] = {}
    try:
        for s in range(m.SubgraphsLength()):
            graph = m.Subgraphs(s)
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                buf = tensor.Buffer()
                if tensor.Type() != _FLOAT32 or not 0 < buf < m.BuffersLength():
                    continue
                shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
                data = m.Buffers(buf).DataAsNumpy()
                if isinstance(data, np.ndarray) and data.size == 4 * int(np.prod(shape)):
                    out.setdefault(shape, {})[buf] = data.tobytes()
    except _CORRUPT as exc:
        raise TfliteError(f".tflite: malformed flatbuffer: {exc}") from exc
    return out


def _float_inits(model: onnx.ModelProto) -> dict[str, npt.NDArray[np.float32]]:
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }


def _stored(w: npt.NDArray[np.float32], perm: tuple[int, ...]) -> bytes:
    return np.ascontiguousarray(w.transpose(perm), dtype="<f4").tobytes()


def weight_slots(data: bytes | bytearray, model: onnx.ModelProto) -> dict[str, WeightSlot]:
    """The slot of every float32 initializer of ``model`` held in exactly one buffer of
    its own in the .tflite ``data`` (see the module invariants); others are left out."""
    by_shape = _float_buffers(_model(data))
    found: dict[str, dict[int, tuple[int, ...]]] = {}
    for name, w in _float_inits(model).items():
        hits: dict[int, tuple[int, ...]] = {}
        for perm in _LAYOUTS.get(w.ndim, (tuple(range(w.ndim)),)):
            want = _stored(w, perm)
            shape = tuple(w.shape[p] for p in perm)
            for buf, stored in by_shape.get(shape, {}).items():
                if buf not in hits and stored == want:
                    hits[buf] = perm
        found[name] = hits
    owners: dict[int, int] = {}
    for hits in found.values():
        for buf in hits:
            owners[buf] = owners.get(buf, 0) + 1
    return {
        name: WeightSlot(buf, perm)
        for name, hits in found.items()
        if len(hits) == 1
        for buf, perm in hits.items()
        if owners[buf] == 1
    }


def patch_weights(base_tflite: bytes, base: onnx.ModelProto, merged: onnx.ModelProto) -> bytes:
    """The .tflite of ``merged`` (``base`` with some initializers changed by a merge),
    made by overwriting those initializers' buffers in a copy of ``base_tflite``.

    Raises ``TfliteError`` if ``base_tflite`` does not hold every weight of ``base``
    (converted from another model), if ``merged`` has other initializers than
    ``base``, or if a changed initializer has no slot.
    """
    slots = weight_slots(base_tflite, base)
    base_w, merged_w = _float_inits(base), _float_inits(merged)
    missing = sorted(n for n, w in base_w.items() if w.ndim >= 2 and n not in slots)
    if missing:
        raise TfliteError(
            f".tflite does not hold the base model's weights {missing[:4]} each in a buffer"
            " of its own: converted from another model, or by an unsupported converter"
        )
    if merged_w.keys() != base_w.keys():
        raise TfliteError("the merged model's initializers differ from the base's")
    out = bytearray(base_tflite)
    m = _model(out)
    changed = 0
    for name, w in merged_w.items():
        if w.shape != base_w[name].shape:
            raise TfliteError(f"{name}: merged shape {w.shape} != base {base_w[name].shape}")
        if w.tobytes() == base_w[name].tobytes():
            continue
        slot = slots.get(name)
        if slot is None:
            raise TfliteError(f"{name} changed but has no buffer of its own in the .tflite")
        view = m.Buffers(slot.buffer).DataAsNumpy()  # a writable view into ``out``
        view[:] = np.frombuffer(_stored(w, slot.perm), np.uint8)  # checked readable above
        changed += 1
    log.debug("patched %d of %d weight buffers", changed, len(slots))
    return bytes(out)


__all__ = ["MAX_TFLITE_BYTES", "WeightSlot", "patch_weights", "tflite_path", "weight_slots"]
