"""The edge daemon's configuration: typed, documented, unknown keys rejected.

Loaded from a JSON file (``edge-daemon run --config``). Audio sources are plugins
picked by ``type`` (a discriminated union). Every byte cap on untrusted input lives
here. ``validate-config`` reports errors with their location.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_daemon.errors import ConfigError
from edge_daemon.inference.backends.config import BackendConfig, OnnxBackendConfig
from fleet_protocol.io.config import load_json_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = Field("127.0.0.1", description="MQTT broker host")
    port: int = Field(8883, ge=1, le=65535, description="MQTT over TLS port")
    ca_cert: Path = Field(description="CA that signed the broker certificate (PEM)")
    client_cert: Path | None = Field(
        None,
        description="a fixed client certificate (PEM, CN = device id); None: the enrolled,"
        " auto-renewed identity in state_dir/tls (needs `enrollment`)",
    )
    client_key: Path | None = Field(None, description="private key of client_cert (PEM)")
    keepalive_s: int = Field(30, ge=5, le=600)

    @model_validator(mode="after")
    def _cert_and_key(self) -> Self:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


class EnrollmentConfig(_Strict):
    """First-boot enrollment and renewal (edge_daemon/enroll.py, docs/adr/0007)."""

    claim_cert: Path = Field(description="the shared claim certificate (PEM), enrollment only")
    claim_key: Path = Field(description="its private key (PEM)")
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the broker's enrollment listener, which alone accepts the claim"
        " certificate (default: broker.port)",
    )
    claim_file: Path = Field(
        description="file holding '<claim id>.<token>' from `cloud-sidecar fleet claim`;"
        " deleted once enrolled"
    )
    timeout_s: float = Field(60, gt=0, le=3600, description="give up enrolling after this")
    renew_at: float = Field(
        2 / 3, gt=0, lt=1, description="renew when this fraction of the lifetime has passed"
    )
    check_every_s: float = Field(60, gt=0, le=86400, description="renewal check period")


class TpmConfig(_Strict):
    tcti: str = Field(
        "device:/dev/tpmrm0", description="TCTI: device:/dev/tpmrm0 or swtpm:host=..,port=.."
    )


class CloudKeysConfig(_Strict):
    unwrap_public_key: Path = Field(description="the cloud HSM's upload-unwrap public key (PEM)")
    ota_public_key: Path = Field(
        description="the trusted OTA signing public key (PEM), pinned at provisioning"
    )
    ack_public_key: Path | None = Field(
        None,
        description="the sidecar's ack-signing public key (PEM), pinned at provisioning; the"
        " device deletes a batch only on an ack it signed (None: never deletes)",
    )


class ModelConfig(_Strict):
    base_fp32: Path = Field(
        description="base model in fp32 ONNX: adapters are merged into a copy of it"
    )
    base_int8: Path = Field(
        description="base model quantized to int8: what runs until an adapter arrives"
    )
    threads: int = Field(1, ge=1, le=8, description="inference runtime threads")
    backend: BackendConfig = Field(
        default_factory=OnnxBackendConfig,
        description="inference runtime plugin, picked by type: onnxruntime | litert | hailo",
    )
    event_threshold: float = Field(
        0.6, gt=0, le=1, description="score above which an event is published"
    )


class FileSourceConfig(_Strict):
    type: Literal["file"] = "file"
    path: Path = Field(description="WAV or FLAC, 16 kHz mono (any PCM width or float)")
    realtime: bool = Field(
        False, description="pace blocks at real time, as a sound card would (replays, fault tests)"
    )
    start_time_ms: int | None = Field(
        None,
        ge=0,
        le=2**53,
        description="wall-clock time (Unix ms) of the file's first sample, so kept windows"
        " carry their real capture time; None: the time the file is opened",
    )


class LiveSourceConfig(_Strict):
    type: Literal["live"] = "live"
    device: str | int | None = Field(
        None,
        description="PortAudio input device: index, or a substring of its name; None = default",
    )
    block_ms: int = Field(100, ge=10, le=1000, description="frames handed over per read")
    latency: Literal["low", "high"] = "high"
    retry_initial_s: float = Field(0.5, gt=0, le=60, description="first retry of a lost device")
    retry_max_s: float = Field(30.0, gt=0, le=3600, description="longest wait between retries")


SourceConfig = Annotated[FileSourceConfig | LiveSourceConfig, Field(discriminator="type")]


class CaptureConfig(_Strict):
    """Capture in its own process (docs/adr/0009-capture-process.md)."""

    isolation: Literal["auto", "process", "inline"] = Field(
        "auto", description="auto: live sources in a capture process, files inline"
    )
    max_lag_frames: int = Field(
        50, ge=2, le=10_000, description="frames queued for a lagging consumer before drops"
    )
    stall_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a capture process silent this long is restarted"
    )
    restart_initial_s: float = Field(0.2, gt=0, le=60)
    restart_max_s: float = Field(30.0, gt=0, le=3600)


class IioSensorConfig(_Strict):
    type: Literal["iio"] = "iio"
    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="sensor name in telemetry")
    device: str = Field(description="IIO device: its `name` attribute, or iio:deviceN")
    channels: tuple[str, ...] = Field(
        (), description="e.g. temp, humidityrelative, pressure, accel_x; empty = all known"
    )


class HwmonSensorConfig(_Strict):
    type: Literal["hwmon"] = "hwmon"
    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="sensor name in telemetry")
    chip: str = Field(description="hwmon chip: its `name` attribute (cpu_thermal), or hwmonN")
    channels: tuple[str, ...] = Field((), description="e.g. temp1, fan1, in0; empty = all known")


SensorSourceConfig = Annotated[IioSensorConfig | HwmonSensorConfig, Field(discriminator="type")]


class LaeqConfig(_Strict):
    enabled: bool = True
    calibration_db: float = Field(
        120.0,
        ge=0,
        le=200,
        description="dB SPL that reads 0 dBFS (AES17); 120 = a -26 dBFS @ 94 dB SPL MEMS mic",
    )


class SensorsConfig(_Strict):
    period_s: float = Field(60.0, ge=0.05, le=86_400, description="sysfs sampling period")
    sysfs_root: Path = Field(Path("/sys"), description="root of sysfs (a fake tree in tests)")
    sources: tuple[SensorSourceConfig, ...] = ()
    laeq: LaeqConfig = LaeqConfig()
    max_rows: int = Field(500_000, ge=100, description="telemetry rows kept on the device")


class GatePolicy(_Strict):
    """The deployment's privacy policy; ``None`` keeps the gate's measured default
    (``edge_daemon.privacy.gate.GateConfig``, ADR 0005)."""

    threshold: float | None = Field(None, gt=0, lt=1, description="VAD speech threshold")
    hysteresis: float | None = Field(None, ge=0, lt=1)
    margin_before_s: float | None = Field(None, ge=0, le=5)
    margin_after_s: float | None = Field(None, ge=0, le=5)
    detectors: list[Literal["denoise", "level", "declip", "tonal"]] | None = Field(
        None, min_length=1, max_length=4, description="conditioned views the VAD scores"
    )
    vad_reset_s: float | None = Field(
        None, ge=0, le=600, description="twin VAD state restart period; 0 = never"
    )


class SelectionConfig(_Strict):
    low_confidence: float = Field(0.7, gt=0, le=1, description="keep windows scored below this")
    audit_fraction: float = Field(0.03, ge=0, le=1, description="random fraction kept for audit")
    max_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    audit_max_fill: float = Field(
        0.5, gt=0, le=1, description="refuse audit samples once unsent data fills this share"
    )
    low_confidence_max_fill: float = Field(
        0.9, gt=0, le=1, description="refuse low-confidence samples once unsent data fills this"
    )
    uplink_bytes_per_day: int | None = Field(
        2_000_000,
        ge=1_000_000,
        description=(
            "cap on kept sample bytes per day of audio (token bucket; the default keeps"
            " uploads near 0.06% of the raw audio bytes); None = no cap"
        ),
    )


class UplinkConfig(_Strict):
    batch_samples: int = Field(64, ge=1, le=1024)
    retry_s: float = Field(
        5.0, gt=0, le=3600, description="resend unacknowledged batches after this"
    )
    retry_max_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="the longest backoff after the cloud answers retry (transient refusal)",
    )


class OtaConfig(_Strict):
    channel: str = "stable"
    max_metadata_bytes: int = Field(64 * 1024, ge=1024)
    max_artifact_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    tuf_root: Path | None = Field(
        None,
        description="the TUF root (1.root.json) pinned in the image: with it the device updates"
        " through TUF over MQTT chunks and two slots (docs/adr/0016); without it, through the"
        " single-key targets document (edge_daemon/ota.py)",
    )
    timestamp_lifetime_h: float = Field(
        24.0, gt=0, description="the repository's timestamp lifetime (clock policy, ota_clock)"
    )
    poll_s: float = Field(3600.0, gt=0, description="check for updates at least this often")
    request_timeout_s: float = Field(10.0, gt=0, description="wait for one chunk's answer")
    health_windows: int = Field(
        60, ge=1, description="classified windows after a switch before CONFIRMED (ota_slots)"
    )


class ServiceConfig(_Strict):
    """How the daemon runs as a service: metrics endpoint, control socket, watchdog."""

    metrics_host: str = Field("127.0.0.1", description="address of GET /metrics")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus metrics here; None: off, 0: any"
    )
    control_socket: Path | None = Field(
        None,
        description="Unix socket `edge-daemon status` reads. Default: $RUNTIME_DIRECTORY"
        "/control.sock under systemd, else state_dir/control.sock",
    )
    stall_s: float = Field(
        60, gt=0, description="a stage without progress this long stops the watchdog pings"
    )


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
    capture: CaptureConfig = CaptureConfig()
    sensors: SensorsConfig = SensorsConfig()
    enrollment: EnrollmentConfig | None = None
    service: ServiceConfig = ServiceConfig()

    @model_validator(mode="after")
    def _identity_source(self) -> Self:
        if self.broker.client_cert is None and self.enrollment is None:
            raise ValueError("set broker.client_cert/client_key or an enrollment section")
        return self


def load_config(path: Path) -> DeviceConfig:
    cfg = load_json_model(path, DeviceConfig, ConfigError)
    return cfg
