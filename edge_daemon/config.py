"""The edge daemon's configuration: typed, documented, unknown keys rejected.

Loaded from a JSON file (``edge-daemon run --config``). Audio sources are plugins
picked by ``type`` (a discriminated union). Every byte cap on untrusted input lives
here. ``validate-config`` reports errors with their location.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_daemon.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = Field("127.0.0.1", description="MQTT broker host")
    port: int = Field(8883, ge=1, le=65535, description="MQTT over TLS port")
    ca_cert: Path = Field(description="CA that signed the broker certificate (PEM)")
    client_cert: Path = Field(description="this device's client certificate (PEM, CN = device id)")
    client_key: Path = Field(description="private key of the client certificate (PEM)")
    keepalive_s: int = Field(30, ge=5, le=600)


class TpmConfig(_Strict):
    tcti: str = Field(
        "device:/dev/tpmrm0", description="TCTI: device:/dev/tpmrm0 or swtpm:host=..,port=.."
    )


class CloudKeysConfig(_Strict):
    unwrap_public_key: Path = Field(description="the cloud HSM's upload-unwrap public key (PEM)")
    ota_public_key: Path = Field(
        description="the trusted OTA signing public key (PEM), pinned at provisioning"
    )


class ModelConfig(_Strict):
    base_fp32: Path = Field(
        description="base model in fp32 ONNX: adapters are merged into a copy of it"
    )
    base_int8: Path = Field(
        description="base model quantized to int8: what runs until an adapter arrives"
    )
    threads: int = Field(1, ge=1, le=8, description="onnxruntime intra-op threads")
    event_threshold: float = Field(
        0.6, gt=0, le=1, description="score above which an event is published"
    )


class SceneSourceConfig(_Strict):
    type: Literal["scene"] = "scene"
    seed: int = 0
    duration_s: int = Field(300, ge=1, le=7 * 24 * 3600)
    siren_pattern: Literal["wail", "yelp", "hilo"] = "hilo"
    hilo_hz: tuple[float, float] = (440.0, 587.0)
    speech_rate: float = Field(0.1, ge=0, le=0.9)
    feedback_coverage: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fraction of windows for which simulated downstream feedback arrives",
    )


class FileSourceConfig(_Strict):
    type: Literal["file"] = "file"
    path: Path


SourceConfig = Annotated[SceneSourceConfig | FileSourceConfig, Field(discriminator="type")]


class GatePolicy(_Strict):
    threshold: float | None = Field(
        None, gt=0, lt=1, description="VAD speech threshold; None = gate default"
    )
    margin_before_s: float | None = Field(None, ge=0, le=5)
    margin_after_s: float | None = Field(None, ge=0, le=5)


class SelectionConfig(_Strict):
    low_confidence: float = Field(0.7, gt=0, le=1, description="keep windows scored below this")
    audit_fraction: float = Field(0.03, ge=0, le=1, description="random fraction kept for audit")
    max_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)


class UplinkConfig(_Strict):
    batch_samples: int = Field(64, ge=1, le=1024)
    retry_s: float = Field(
        5.0, gt=0, le=3600, description="resend unacknowledged batches after this"
    )


class OtaConfig(_Strict):
    channel: str = "stable"
    max_metadata_bytes: int = Field(64 * 1024, ge=1024)
    max_artifact_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class EvalConfig(_Strict):
    """A held-out scene with ground truth, scored at start and after every update (simulation only)."""

    source: SceneSourceConfig
    shifted_classes: tuple[str, ...] = ("siren",)


class DeviceConfig(_Strict):
    device_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    state_dir: Path = Field(description="replay buffer, key blobs, installed models, OTA state")
    broker: BrokerConfig
    tpm: TpmConfig
    cloud: CloudKeysConfig
    model: ModelConfig
    source: SourceConfig
    gate: GatePolicy = GatePolicy()
    selection: SelectionConfig = SelectionConfig()
    uplink: UplinkConfig = UplinkConfig()
    ota: OtaConfig = OtaConfig()
    evaluation: EvalConfig | None = None


def load_config(path: Path) -> DeviceConfig:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    if len(raw) > 1024 * 1024:
        raise ConfigError(f"config {path} is larger than 1 MiB")
    try:
        return DeviceConfig.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: line {e.lineno} column {e.colno}: {e.msg}") from e
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(lines)) from e
