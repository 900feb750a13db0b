"""On-device inference: the classifier runtime and the adapter merge.

``onnx_backend`` runs the int8 classifier with onnxruntime; ``adapter`` merges a
``lora-lowrank-v1`` adapter into the device's own fp32 base and re-quantizes it with
``int8`` (static QDQ, calibrated on the base's calibration set). Nothing under this
package imports torch (the device image ships without it).
"""
