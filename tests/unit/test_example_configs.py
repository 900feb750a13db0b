"""The commented production configurations in examples/ are accepted by validate-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cloud_sidecar.config import load_config as load_cloud
from edge_daemon.config import load_config as load_device

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_example_passes_edge_daemon_validate_config() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_daemon",
            "validate-config",
            "--config",
            "examples/device.json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "valid configuration for device sensor-berlin-0042" in out.stdout


def test_the_device_example_runs_as_the_units_expect() -> None:
    cfg = load_device(ROOT / "examples" / "device.json")
    assert cfg.tpm.tcti == "device:/dev/tpmrm0"
    assert cfg.broker.client_cert is None and cfg.enrollment is not None  # enrolls on first boot
    assert str(cfg.enrollment.claim_cert).startswith("/run/credentials/edge-daemon.service/")
    assert cfg.state_dir == Path("/var/lib/edge-daemon")  # StateDirectory=edge-daemon
    assert cfg.service.metrics_port == 9101


def test_the_sidecar_example_is_valid_and_inside_the_eu() -> None:
    cfg = load_cloud(ROOT / "examples" / "cloud.json")  # also checks residency
    assert cfg.hsm.pin_file is None and cfg.hsm.pin_credential == "hsm-pin"
    assert cfg.metrics is not None and cfg.metrics.port == 9464
