"""All fleet_model exceptions. Root: ``ModelError``.

Both services catch ``ModelError`` at their boundary and map it to their own error
(the device's OTA client reports the update failed; pretraining and training stop
with a ``TrainingError``), so no model-format failure escapes as a traceback.
"""


class ModelError(Exception):
    """Root of every failure of the shared model code."""


class AdapterError(ModelError):
    """An edge adapter is malformed, names another base model, or does not fit its graph."""


class CalibrationError(ModelError):
    """The int8 calibration set is malformed or is not the one the model names."""


class QuantizationError(ModelError):
    """The int8 recipe cannot quantize this graph (not the classifier it knows)."""


class TfliteError(ModelError):
    """A .tflite is not the base's conversion, or a merged weight has no buffer in it."""


class GoldenError(ModelError):
    """Golden clips shipped with an adapter are malformed or out of their bounds."""
