"""Provisioning for the embedded default: what flashing and enrolment would leave behind.

Writes the sidecar's config, each device's config (certificates, pinned cloud public
keys, the base model: fp32, int8 and the int8 calibration set, copied into the device's
state as an SD-card image would carry it), creates each device's TPM keys and registers
their public keys with the cloud.
With ``claim_device`` + ``device_config(claim_file=...)`` a device gets no certificate
at all: only the shared claim certificate and a one-time claim, and it enrolls on first
start (docs/adr/0007-device-identity-and-enrollment.md); ``enroll_device`` is the older
direct registration, kept for fixed-certificate setups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from devstack.mosquitto import crl_hook_argv
from devstack.stack import DeviceSlot, DevStack
from fleet_model import calibration_path
from fleet_model.tflite_patch import tflite_path

# File names of `cloud-sidecar pretrain`'s output (cloud_sidecar.pretrain; not imported: torch).
FP32_FILE, INT8_FILE = "base.fp32.onnx", "base.int8.onnx"
# The int8 calibration set ships beside the fp32 base: the device re-quantizes with it.
CALIB_FILE = calibration_path(Path(FP32_FILE)).name
TFLITE_FILE = tflite_path(Path(FP32_FILE)).name  # what a LiteRT device patches (ADR 0011)


def _json(path: Path, obj: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path


def cloud_config(
    stack: DevStack,
    data_dir: Path,
    base_model_dir: Path,
    *,
    allow_unattested_keys: bool = False,
    **train: Any,
) -> Path:
    """The sidecar's config for ``stack``. Enrollment asks for TPM credential activation
    against the stack's EK CA (made when its first TPM was manufactured); a caller whose
    stack has no TPM, and that enrolls nothing, opts out with ``allow_unattested_keys``."""
    if not allow_unattested_keys and not stack.ek_ca_cert.exists():
        raise ValueError(
            "the stack has manufactured no TPM yet (no EK CA): add a device first,"
            " or pass allow_unattested_keys=True where attestation is not tested"
        )
    attestation: dict[str, Any] = {"allow_unattested_keys": True} if allow_unattested_keys else {}
    return _json(
        data_dir.parent / "cloud.json",
        {
            "data_dir": data_dir,
            "region": "eu-central-1",
            "base_model_dir": base_model_dir,
            "broker": {
                "host": "127.0.0.1",
                "port": stack.broker.service_port or stack.broker.port,
                "ca_cert": stack.ca.cert_path,
                "client_cert": stack.cloud_cert.cert,
                "client_key": stack.cloud_cert.key,
                "ota_client_cert": stack.ota_cert.cert,  # its own CN: writes the OTA tree
                "ota_client_key": stack.ota_cert.key,
                "region": "on-prem-de",  # loopback broker: the operator's own site
            },
            "hsm": {
                "module": stack.token.module,
                "token_label": stack.token.label,
                "pin_file": stack.workdir / "hsm" / "pin",
                "env": stack.token.env(),
                "region": "on-prem-de",  # SoftHSM token on this machine
            },
            "train": train,
            # enrollment: the token's fleet-ca key signs device certs (docs/adr/0007)
            "fleet": {
                "ca_dir": stack.ca.directory,
                "ca_signer": "hsm",
                "crl_hook": crl_hook_argv(stack.broker),
                # devices prove their identity key lives in a TPM (ADR 0018): the swtpm
                # "manufacturer" CA, made when the stack's first TPM was manufactured
                "ek_ca_certs": [stack.ek_ca_cert] if stack.ek_ca_cert.exists() else [],
                **attestation,
            },
        },
    )


ACK_PUBLIC_KEY_FILE = "ack-signing.pub.pem"


def export_cloud_keys(stack: DevStack, out_dir: Path) -> tuple[Path, Path]:
    """Create the cloud's keys inside the token; export only their public halves."""
    os.environ.update(stack.token.env())
    from cloud_sidecar.keys.hsm import Hsm

    out_dir.mkdir(parents=True, exist_ok=True)
    with Hsm(str(stack.token.module), stack.token.label, stack.token.user_pin) as hsm:
        hsm.ensure_keys()
        unwrap = out_dir / "upload-unwrap.pub.pem"
        signing = out_dir / "ota-signing.pub.pem"
        unwrap.write_bytes(hsm.unwrap_public_key_pem())
        signing.write_bytes(hsm.signing_public_key_pem())
        (out_dir / ACK_PUBLIC_KEY_FILE).write_bytes(hsm.ack_public_key_pem())
    return unwrap, signing


def tuf_root(cloud_cfg: Path, out_dir: Path) -> Path | None:
    """Create the cloud's TUF repository now and return its ``1.root.json`` for the images.

    ``None`` when python-tuf is not installed (docs/adr/0016): devices then update
    through the single-key document. The root keys are development keys in the data dir.
    """
    from cloud_sidecar import ota_publish
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_hsm

    if not ota_publish.tuf_available():
        return None
    cfg = load_config(cloud_cfg)
    hsm = open_hsm(cfg)
    try:
        repo = ota_publish.open_repository(cfg, hsm)
    finally:
        hsm.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / "1.root.json"
    shutil.copy2(repo.metadata_dir / "1.root.json", root)
    return root


def device_config(
    stack: DevStack,
    slot: DeviceSlot,
    base_model_dir: Path,
    cloud_keys: tuple[Path, Path],
    source: dict[str, Any],
    claim_file: Path | None = None,
    selection: dict[str, Any] | None = None,
    tuf_root: Path | None = None,
) -> Path:
    """A device's config; with ``claim_file`` it enrolls on first start (no client cert).

    ``source`` is the device's audio source section as an operator writes it (a
    ``file`` replay of devstack's scene, or ``live``); nothing in it is simulation.
    """
    models = slot.state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in (FP32_FILE, INT8_FILE, CALIB_FILE, TFLITE_FILE):
        shutil.copy2(base_model_dir / name, models / name)
    broker: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": stack.broker.port,
        "ca_cert": stack.ca.cert_path,
    }
    identity: dict[str, Any] = {}
    if claim_file is None:
        broker |= {"client_cert": slot.cert.cert, "client_key": slot.cert.key}
    else:
        claim = {
            "claim_cert": stack.claim_cert.cert,
            "claim_key": stack.claim_cert.key,
            "port": stack.broker.enroll_port,
        }
        identity["enrollment"] = {**claim, "claim_file": claim_file, "timeout_s": 180}
    return _json(
        slot.state_dir.parent / f"{slot.device_id}.json",
        {
            "device_id": slot.device_id,
            "state_dir": slot.state_dir,
            "broker": broker,
            **identity,
            "tpm": {"tcti": slot.tpm.tcti},
            "cloud": {
                "unwrap_public_key": cloud_keys[0],
                "ota_public_key": cloud_keys[1],
                # pinned beside the others: acks are signed by the token (docs/adr/0017)
                "ack_public_key": cloud_keys[0].parent / ACK_PUBLIC_KEY_FILE,
            },
            "model": {
                "base_fp32": models / FP32_FILE,
                "base_int8": models / INT8_FILE,
            },
            "source": source,
            "selection": selection or {},
            **({"ota": {"tuf_root": tuf_root}} if tuf_root is not None else {}),
        },
    )


def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        argv, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def enroll_device(config: Path, cloud_cfg: Path, device_id: str) -> None:
    """Create the device's TPM keys and register its public key with the cloud."""
    pem = _run([sys.executable, "-m", "edge_daemon", "keys", "--config", str(config)])
    pub = config.with_suffix(".pub.pem")
    pub.write_text(pem)
    _run(
        [
            sys.executable,
            "-m",
            "cloud_sidecar",
            "fleet",
            "--config",
            str(cloud_cfg),
            "register",
            device_id,
            "--public-key",
            str(pub),
        ]
    )


def claim_device(cloud_cfg: Path, slot: DeviceSlot) -> Path:
    """``cloud-sidecar fleet claim``: write the one-time claim where the device's image has it."""
    cli = [sys.executable, "-m", "cloud_sidecar", "fleet", "--config", str(cloud_cfg)]
    claim = _run([*cli, "claim", slot.device_id]).strip()
    path = slot.state_dir.parent / f"{slot.device_id}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(claim + "\n")
    path.chmod(0o600)
    return path
