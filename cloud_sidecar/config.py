"""The sidecar's configuration: typed, documented, unknown keys rejected.

The HSM PIN never sits in the config: it is read from systemd's credentials directory
(``$CREDENTIALS_DIRECTORY/<pin_credential>``) or, for development, from ``pin_file``.

Every endpoint (broker, HSM, data_dir, and any ``residency.other_endpoints``) declares
its region; ``load_config`` refuses a configuration in which any of them lies outside
the residency policy (``cloud_sidecar.residency``), naming the endpoint.

Config is code (``cloud_sidecar.trust``): ``load_config`` refuses a file that anyone but
root or the service user could have written; ``residency.allowed_regions`` may only
narrow the built-in EU list; the PKCS#11 module, its environment and the CRL hook are
checked before they are loaded or run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.residency import MAX_REGION_LEN, ResidencyPolicy
from cloud_sidecar.trust import check_config_file
from fleet_protocol.io.config import load_json_model

Region = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_REGION_LEN,
        description="jurisdiction/region id (e.g. eu-central-1, on-prem-de); see residency.py",
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8883, ge=1, le=65535)
    ca_cert: Path
    client_cert: Path = Field(description="serve's identity (ingest, acks, enrollment)")
    client_key: Path
    region: Region
    ota_client_cert: Path | None = Field(
        None,
        description="the OTA publisher's identity (another CN: the only one the broker lets"
        " write the OTA tree, ADR 0018); needed to publish OTA metadata",
    )
    ota_client_key: Path | None = None


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
    region: Region

    def pin(self) -> str:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / self.pin_credential).is_file():
            return (Path(cred_dir) / self.pin_credential).read_text().strip()
        if self.pin_file is not None:
            return self.pin_file.read_text().strip()
        raise ConfigError("hsm: no PIN: set the systemd credential or hsm.pin_file")


# Why train.method "qlora" is refused (cloud_sidecar/finetune.py, docs/ml-pipeline.md).
QLORA_UNAVAILABLE = (
    "QLoRA is not available for this model: it needs bitsandbytes' 4-bit layers, which"
    " quantise nn.Linear only (AudioCNN's four Conv2d layers carry most of its weights and"
    " ~97% of its multiply-adds), and bitsandbytes (not in requirements/lock.txt) needs a"
    " CUDA GPU for 4-bit training; the base is < 200k parameters, so a 4-bit base would"
    " save well under 1 MiB. Use train.method 'lora' (default) or 'full'"
    " (docs/ml-pipeline.md, 'Fine-tuning methods')"
)
LoraTarget = Literal["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]  # model.ADAPTABLE_LAYERS


class TrainConfig(_Strict):
    method: Literal["lora", "full", "qlora"] = Field(
        "lora",
        description="fine-tuning method: 'lora' (PEFT LoRA on `targets`), 'full' (every"
        " weight; shipped as full-rank LoRA factors); 'qlora' is refused",
    )
    # Rank 1 on conv3, conv4 and fc1: the edge adapter is 6.4 kB, 4.2% of the int8 base,
    # and lifts the bench scene's macro-F1 from 0.83 to 0.93 (two-tone sirens); rank 8 on
    # every layer was 54 kB (35%) for 0.95 (BENCHMARKS.md, train.*; docs/ml-pipeline.md).
    rank: int = Field(1, ge=1, le=64, description="LoRA rank")
    targets: tuple[LoraTarget, ...] = Field(
        ("conv3", "conv4", "fc1"),
        min_length=1,
        description="layers LoRA adapts (the edge adapter's size grows with each)",
    )
    epochs: int = Field(12, ge=1, le=200)
    min_samples: int = Field(
        32, ge=1, description="fewer labelled samples than this: no training run"
    )
    replay_per_class: int = Field(
        100,
        ge=0,
        description="base-distribution samples per class mixed in (from the base's"
        " replay.npz; at most what pretraining saved)",
    )
    golden_per_class: int = Field(
        40,
        ge=1,
        description="golden-set samples per class for the gate (from the base's golden.npz;"
        " at most what pretraining saved)",
    )
    max_golden_drop: float = Field(
        0.02, ge=0, le=1, description="gate: allowed golden-set accuracy drop"
    )
    min_val_gain: float = Field(
        0.0, ge=-1, le=1, description="gate: required accuracy gain on the validation split"
    )
    max_macro_f1_drop: float = Field(
        0.0, ge=0, le=1, description="gate: allowed macro-F1 drop vs production (val, golden)"
    )
    max_class_recall_drop: float = Field(
        0.02, ge=0, le=1, description="gate: allowed recall drop of any one class (val, golden)"
    )
    max_device_accuracy_drop: float = Field(
        0.02, ge=0, le=1, description="gate: allowed accuracy drop on any one device (val)"
    )
    max_membership_auc: float = Field(
        0.6,
        ge=0.5,
        le=1,
        description="gate: AUC of a loss-threshold membership-inference attack (train vs"
        " validation windows) above this refuses the candidate; 1 disables",
    )
    min_membership_samples: int = Field(
        50,
        ge=1,
        description="gate: the membership AUC is gated only with this many held-out windows",
    )
    gate_tolerance_windows: int = Field(
        1,
        ge=0,
        description="gate: a per-class or per-device drop of at most this many windows"
        " does not fail (the evaluation set's resolution); 0: strict",
    )
    min_gate_support: int = Field(
        10,
        ge=1,
        description="gate: a class or device with fewer evaluation samples than this is"
        " reported but not gated (one sample would swing it by more than the threshold)",
    )
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between metrics (loss, grad norm, lr)")
    price_per_hour: float = Field(
        0.0, ge=0, description="what the training machine costs per hour; 0: not tracked"
    )
    budget: float = Field(
        0.0,
        ge=0,
        description="one run's budget (same currency): alert when the projected cost is"
        " 20% over, stop at 3x; 0: none",
    )

    @field_validator("method")
    @classmethod
    def _trainable_method(cls, v: str) -> str:
        if v == "qlora":
            raise ValueError(QLORA_UNAVAILABLE)
        return v


class TriggerConfig(_Strict):
    """When `train --if-triggered` trains (cloud_sidecar/triggers.py)."""

    max_interval_days: float = Field(7, gt=0, description="schedule: train at least this often")
    min_new_labels: int = Field(200, ge=1, description="labelled samples since the last run")
    misprediction_rate: float = Field(
        0.3, gt=0, le=1, description="share of recent labelled samples the devices got wrong"
    )
    confidence_ks: float = Field(
        0.2, gt=0, le=1, description="KS statistic of the devices' confidence (audit samples)"
    )
    reference_days: float = Field(7, gt=0, description="confidence reference window")
    min_support: int = Field(50, ge=1, description="samples needed before a drift signal counts")


class DataConfig(_Strict):
    """Dataset building: governance record, preparation rules, split (cloud_sidecar/dataset.py)."""

    controller: str = Field("", max_length=200, description="the data controller (a city body)")
    legal_basis: str = Field(
        "GDPR Art. 6(1)(e): public task",
        max_length=200,
        description="legal basis of the processing, recorded in every dataset manifest",
    )
    purpose: str = Field(
        "adapting the city's sound-event classifier to its sensors' streets",
        max_length=500,
        description="purpose of the processing, recorded in every dataset manifest",
    )
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares (by hash of the sample id)"
    )
    near_duplicate_rms: float = Field(
        0.02,
        ge=0,
        description="windows closer than this RMS difference (feature units) are one sound;"
        " 0 disables near-duplicate removal",
    )
    speech_scanner: Path | None = Field(
        None,
        description="the residual speech scanner (.npz, cloud_sidecar/residual_scan.py);"
        " None: no scan (the manifest says so)",
    )
    max_residual_speech_rate: float = Field(
        0.001, ge=0, le=1, description="a dataset build halts above this flagged share"
    )
    saturated_share: float = Field(
        0.5, gt=0, le=1, description="quality: share of cells at the window maximum"
    )
    constant_std: float = Field(1e-3, ge=0, description="quality: a stuck (frozen) input")


class StoreConfig(_Strict):
    """Which store implementation keeps devices, uploads and labels (store_api.py)."""

    backend: Literal["sqlite", "postgresql"] = Field(
        "sqlite",
        description="sqlite: data_dir/store.sqlite3 (one machine); postgresql: a server"
        " reached with `dsn` (several sidecar processes or hosts)",
    )
    dsn: str = Field(
        "",
        max_length=1024,
        description="libpq connection string without the password, e.g."
        " 'host=db.eu port=5432 dbname=sidecar user=sidecar sslmode=verify-full'",
    )
    password_credential: str = Field(
        "store-password", description="name of the systemd credential holding the password"
    )
    password_file: Path | None = Field(None, description="development only: the password")
    region: str | None = Field(
        None,
        max_length=MAX_REGION_LEN,
        description="where the database server lives; required for postgresql",
    )

    def conninfo(self) -> str:
        if self.backend != "postgresql" or not self.dsn:
            raise ConfigError("store: backend postgresql needs store.dsn")
        password = ""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / self.password_credential).is_file():
            password = (Path(cred_dir) / self.password_credential).read_text().strip()
        elif self.password_file is not None:
            password = self.password_file.read_text().strip()
        if not password:
            return self.dsn
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"{self.dsn} password='{escaped}'"


class OtaConfig(_Strict):
    channel: str = "stable"
    require_approval: bool = Field(
        True,
        description="`release publish` refuses a version no named approver has approved"
        " (`release approve VERSION --approver NAME`)",
    )
    expires_days: int = Field(30, ge=1, le=365)
    cohort: str = "all"
    timestamp_refresh_s: float = Field(
        8 * 3600.0,
        gt=0,
        description="serve re-signs the TUF timestamp this often (it expires after 24 h)",
    )
    rollout_step_s: float = Field(
        60.0, gt=0, description="serve steps a running rollout this often (cloud_sidecar.rollout)"
    )


class FleetConfig(_Strict):
    """Enrollment and revocation (cloud_sidecar/fleet.py, docs/adr/0007)."""

    ca_dir: Path = Field(description="fleet CA: ca.pem, crl.pem (and ca.key for the file signer)")
    ca_signer: Annotated[str, Field(pattern="^(hsm|file)$")] = Field(
        "hsm",
        description="who holds the CA key: hsm (the token's fleet-ca key, cloud_sidecar/ca.py)"
        " or file (<ca_dir>/ca.key; tests only)",
    )
    cert_valid_s: int = Field(
        7 * 24 * 3600, ge=60, le=90 * 24 * 3600, description="device certificate lifetime"
    )
    claim_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="a claim expires after this")
    max_clock_skew_s: int = Field(
        600, ge=1, description="a request further off this clock is counted and audited (ADR 0017)"
    )
    ek_ca_certs: tuple[Path, ...] = Field(
        (),
        description="certificates of the TPM manufacturers' EK CAs: enrollment asks each"
        " device to prove its identity key lives in a TPM with such an EK (credential"
        " activation, docs/adr/0018); required unless allow_unattested_keys",
    )
    allow_unattested_keys: bool = Field(
        False,
        description="development only: enroll without credential activation when"
        " ek_ca_certs is empty (any holder of a claim may enroll a software key);"
        " logged and audited (fleet.unattested_keys_allowed) at every start",
    )
    crl_hook: tuple[str, ...] = Field(
        (),
        description="argv run with the CRL path appended after each revocation; it must"
        " make the broker(s) reload their CRL (devstack: devstack.mosquitto's reload-crl)",
    )

    @model_validator(mode="after")
    def _attested_unless_allowed(self) -> FleetConfig:
        if not self.ek_ca_certs and not self.allow_unattested_keys:
            raise ValueError(
                "fleet.ek_ca_certs is empty: name the TPM manufacturers' EK CA certificates"
                " (credential activation), or set fleet.allow_unattested_keys: true"
                " (development only)"
            )
        return self


class ResidencyConfig(_Strict):
    allowed_regions: tuple[str, ...] | None = Field(
        None,
        description="regions data may live in or pass through; default: the EU list in"
        " cloud_sidecar/residency.py plus on-prem-<EU country code>",
    )
    other_endpoints: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="further endpoints and their regions (e.g. a model or container"
        " registry, backups), checked like the broker, HSM and data_dir",
    )

    @field_validator("allowed_regions")
    @classmethod
    def _never_wider_than_the_eu_list(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        eu = ResidencyPolicy.eu_default()
        wider = [r for r in v or () if not eu.allows(r)]
        if wider:
            raise ValueError(
                f"allowed_regions may only narrow the built-in EU list; {wider[:5]} are outside"
            )
        return v

    def policy(self) -> ResidencyPolicy:
        if self.allowed_regions is None:
            return ResidencyPolicy.eu_default()
        return ResidencyPolicy.only(self.allowed_regions)


class MetricsConfig(_Strict):
    host: str = Field("127.0.0.1", description="address of GET /metrics (Prometheus)")
    port: int = Field(9464, ge=0, le=65535, description="0: any free port (logged)")
    textfile: Path | None = Field(
        None,
        description="`train` writes its progress here for node_exporter's textfile collector"
        " (a *.prom name in --collector.textfile.directory); None: data_dir/metrics/train.prom",
    )


class SidecarConfig(_Strict):
    data_dir: Path = Field(description="store, audit log, datasets, adapters, OTA repository")
    region: str = Field(
        min_length=1,
        max_length=MAX_REGION_LEN,
        description="where data_dir lives (object store: samples, datasets, model"
        " registry, OTA repository, audit log); recorded with every entry",
    )
    base_model_dir: Path = Field(description="output of `cloud-sidecar pretrain`")
    broker: BrokerConfig
    hsm: HsmConfig
    train: TrainConfig = TrainConfig()
    ota: OtaConfig = OtaConfig()
    fleet: FleetConfig | None = Field(None, description="enrollment; None: not served")
    store: StoreConfig = StoreConfig()
    data: DataConfig = DataConfig()
    triggers: TriggerConfig = TriggerConfig()
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    residency: ResidencyConfig = ResidencyConfig()
    audit_checkpoint_s: float = Field(
        3600, ge=1, description="serve: seconds between HSM-signed audit checkpoints"
    )
    stall_s: float = Field(
        30,
        gt=0,
        description="serve: a loop holding one message this long is stalled and stops the"
        " watchdog pings (keep it under the unit's WatchdogSec=60)",
    )
    metrics: MetricsConfig | None = Field(
        None, description="serve GET /metrics here (docs/metrics.md); None: only metrics.prom"
    )
    audit_checkpoint_file: Path | None = Field(
        None,
        description="separate append-only copy of every checkpoint; put it on other"
        " storage (another host, a WORM bucket). Default: data_dir/audit.checkpoints.jsonl",
    )

    def open_audit(self) -> AuditLog:
        return AuditLog(self.data_dir / "audit.jsonl", self.region, self.audit_checkpoint_file)

    def endpoint_regions(self) -> dict[str, str]:
        """Every endpoint the sidecar uses, named for error messages, and its region."""
        return {
            f"broker ({self.broker.host}:{self.broker.port})": self.broker.region,
            f"hsm (token {self.hsm.token_label!r})": self.hsm.region,
            f"object store (data_dir {self.data_dir})": self.region,
            **(
                {"store (postgresql)": self.store.region or ""}
                if self.store.backend == "postgresql"
                else {}
            ),
            **self.residency.other_endpoints,
        }

    def check_residency(self) -> None:
        """Raise ``ResidencyError`` naming any endpoint outside the allowed regions."""
        self.residency.policy().check(self.endpoint_regions())

    @property
    def ota_repo_dir(self) -> Path:
        return self.data_dir / "ota-repo"


def load_config(path: Path) -> SidecarConfig:
    check_config_file(path)  # config is code: only root or this user may have written it
    cfg = load_json_model(path, SidecarConfig, ConfigError)
    cfg.check_residency()
    return cfg
