"""Installing an edge adapter on the device: read capped files, merge, write atomically.

The format and the merge belong to ``fleet_model`` (shared with the cloud, which runs
the same merge to judge the exact model a device builds); this module only does the
device's file I/O around it. Invariants:

- every file is read with its cap (``fleet_model``'s limits) before it is parsed;
- nothing is written before the merge and the quantization succeeded; then the merged
  fp32 (``merged_fp32_path``) and the int8 model are each written atomically (temp,
  fsync, rename), so a failure leaves no partial model and the running model untouched;
- the int8 model is quantized with the calibration set beside the base
  (``fleet_model.calibration_path(base_fp32)``);
- every failure is an ``OtaError`` (the update is refused, the running model stays).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_daemon.errors import OtaError
from fleet_model import ModelError, calibration_path, merge_and_quantize
from fleet_model.adapter import MAX_ADAPTER_BYTES
from fleet_model.int8 import MAX_CALIBRATION_BYTES, MAX_MODEL_BYTES
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of ``path``, or ``OtaError`` if unreadable or larger than ``cap``."""
    try:
        size = path.stat().st_size
        if size > cap:
            raise OtaError(f"{path}: {size} bytes exceeds {cap}")
        return path.read_bytes()
    except OSError as exc:
        raise OtaError(f"cannot read {path}: {exc}") from exc


def merged_fp32_path(out_int8: Path) -> Path:
    """Where ``apply_adapter`` keeps the merged fp32 model: next to the int8 one."""
    name = out_int8.name
    stem = name[: -len(".int8.onnx")] if name.endswith(".int8.onnx") else out_int8.stem
    return out_int8.with_name(f"{stem}.fp32.onnx")


def apply_adapter(base_fp32: Path, edge_adapter: Path, out_int8: Path) -> Path:
    """Merge ``edge_adapter`` into ``base_fp32``; write merged fp32 and int8; return int8.

    Raises ``OtaError`` if a file is unreadable or over its cap, or if ``fleet_model``
    refuses the adapter or the calibration set. Nothing is written before every check
    passed.
    """
    adapter = read_capped(edge_adapter, MAX_ADAPTER_BYTES)
    base = read_capped(base_fp32, MAX_MODEL_BYTES)
    calibration = read_capped(calibration_path(base_fp32), MAX_CALIBRATION_BYTES)
    try:
        merged = merge_and_quantize(base, adapter, calibration)
    except ModelError as exc:
        raise OtaError(str(exc)) from exc
    write_atomic(merged_fp32_path(out_int8), merged.fp32, 0o644)
    write_atomic(out_int8, merged.int8, 0o644)
    log.info("installed %d-layer adapter -> %s", merged.n_layers, out_int8)
    return out_int8
