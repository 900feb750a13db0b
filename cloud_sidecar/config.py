"""The sidecar's configuration: typed, documented, unknown keys rejected.

The HSM PIN never sits in the config: it is read from systemd's credentials directory
(``$CREDENTIALS_DIRECTORY/<pin_credential>``) or, for development, from ``pin_file``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sidecar.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8883, ge=1, le=65535)
    ca_cert: Path
    client_cert: Path
    client_key: Path


class HsmConfig(_Strict):
    module: Path = Field(description="PKCS#11 module (.so) of the HSM")
    token_label: str
    pin_credential: str = Field(
        "hsm-pin", description="name of the systemd credential holding the PIN"
    )
    pin_file: Path | None = Field(None, description="development only: a file holding the PIN")
    env: dict[str, str] = Field(
        default_factory=dict, description="environment the module needs (e.g. SOFTHSM2_CONF)"
    )

    def pin(self) -> str:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / self.pin_credential).is_file():
            return (Path(cred_dir) / self.pin_credential).read_text().strip()
        if self.pin_file is not None:
            return self.pin_file.read_text().strip()
        raise ConfigError("hsm: no PIN: set the systemd credential or hsm.pin_file")


class TrainConfig(_Strict):
    rank: int = Field(8, ge=1, le=64, description="LoRA rank")
    epochs: int = Field(12, ge=1, le=200)
    min_samples: int = Field(
        32, ge=1, description="fewer labelled samples than this: no training run"
    )
    val_fraction: float = Field(0.25, gt=0, lt=1)
    replay_per_class: int = Field(
        40, ge=0, description="base-distribution samples per class mixed in"
    )
    golden_per_class: int = Field(40, ge=1, description="golden-set samples per class for the gate")
    max_golden_drop: float = Field(
        0.02, ge=0, le=1, description="gate: allowed golden-set accuracy drop"
    )
    min_val_gain: float = Field(
        0.0, ge=-1, le=1, description="gate: required gain on the held-out split"
    )
    seed: int = 0


class OtaConfig(_Strict):
    channel: str = "stable"
    expires_days: int = Field(30, ge=1, le=365)
    cohort: str = "all"


class SidecarConfig(_Strict):
    data_dir: Path = Field(description="store, audit log, datasets, adapters, OTA repository")
    region: str = Field(
        "eu-central-1", description="where data_dir lives; recorded with every entry"
    )
    base_model_dir: Path = Field(description="output of `cloud-sidecar pretrain`")
    broker: BrokerConfig
    hsm: HsmConfig
    train: TrainConfig = TrainConfig()
    ota: OtaConfig = OtaConfig()
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    @property
    def ota_repo_dir(self) -> Path:
        return self.data_dir / "ota-repo"


def load_config(path: Path) -> SidecarConfig:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    if len(raw) > 1024 * 1024:
        raise ConfigError(f"config {path} is larger than 1 MiB")
    try:
        return SidecarConfig.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: line {e.lineno} column {e.colno}: {e.msg}") from e
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(lines)) from e
