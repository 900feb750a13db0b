"""fleet_model: what the device and the cloud must compute identically.

The edge adapter format (``ADAPTER_FORMAT``, ``encode_edge_adapter``,
``parse_edge_adapter``), the golden clips shipped with it (``fleet_model.golden``), the
low-rank merge (``merge_into``, ``merge_and_quantize``),
the int8 recipe with its calibration set (``quantize_model``), and the merged weights
patched into the base's converted .tflite (``fleet_model.tflite_patch``, imported on
its own: only LiteRT needs it). Bytes in, bytes out: no torch, no TensorFlow, no file
I/O, no sockets; it imports only ``fleet_protocol`` (and numpy, onnx, onnxruntime,
safetensors, the tflite schema).
Errors: ``fleet_model.errors`` (root ``ModelError``).
"""

from fleet_model.adapter import (
    ADAPTER_FORMAT,
    EdgeAdapter,
    LowRankLayer,
    MergedModel,
    encode_edge_adapter,
    merge_and_quantize,
    merge_into,
    parse_edge_adapter,
)
from fleet_model.errors import (
    AdapterError,
    CalibrationError,
    GoldenError,
    ModelError,
    QuantizationError,
    TfliteError,
)
from fleet_model.int8 import (
    QUANT_LAYERS,
    RECIPE,
    calibration_path,
    encode_calibration,
    parse_calibration,
    quantize_model,
    set_calibration_sha,
)

__all__ = [
    "ADAPTER_FORMAT",
    "QUANT_LAYERS",
    "RECIPE",
    "AdapterError",
    "CalibrationError",
    "EdgeAdapter",
    "GoldenError",
    "LowRankLayer",
    "MergedModel",
    "ModelError",
    "QuantizationError",
    "TfliteError",
    "calibration_path",
    "encode_calibration",
    "encode_edge_adapter",
    "merge_and_quantize",
    "merge_into",
    "parse_calibration",
    "parse_edge_adapter",
    "quantize_model",
    "set_calibration_sha",
]
