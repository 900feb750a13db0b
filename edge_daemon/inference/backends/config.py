"""Inference backend configs: one pydantic model per plugin, picked by ``type``.

Owns: the ``model.backend`` section of the device config. Each plugin is a frozen,
extra-forbidding model with a ``type: Literal[...]`` tag; ``BackendConfig`` is their
discriminated union, so a config names exactly one backend and a typo in ``type`` or
in a field is refused at load time. Imports nothing heavy (no runtime libraries):
``edge_daemon.config`` imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxBackendConfig(_Strict):
    """onnxruntime on the CPU (the default): the int8 model, or fp32 when asked."""

    type: Literal["onnxruntime"] = "onnxruntime"
    precision: Literal["int8", "fp32"] = Field(
        "int8", description="which of the model's files runs: int8 (default) or fp32"
    )


class LiteRtBackendConfig(_Strict):
    """LiteRT (``ai-edge-litert``) on the CPU, XNNPACK: the base's ``.tflite`` (converted
    by pretraining, beside ``model.base_fp32``), with an adapter's merged weights patched
    in on the device, so adapters apply without a converter."""

    type: Literal["litert"] = "litert"


class HailoBackendConfig(_Strict):
    """A Hailo-8/8L accelerator (Raspberry Pi AI HAT+) through HailoRT.

    The HEF is compiled off the device with Hailo's Dataflow Compiler; the device
    cannot merge an adapter into it (see ADR 0011).
    """

    type: Literal["hailo"] = "hailo"
    hef: Path = Field(description="the base model compiled for the Hailo device (.hef)")
    device_id: str | None = Field(None, description="PCIe id of the device; None = the first")


BackendConfig = Annotated[
    OnnxBackendConfig | LiteRtBackendConfig | HailoBackendConfig, Field(discriminator="type")
]
