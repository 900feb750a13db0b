"""The systemd units in systemd/: hardened (exposure <= 2.0) and clean under `verify`.

Runs `systemd-analyze security --offline=true` on each service and `systemd-analyze
verify --root` on all units in a scratch root holding the host's own unit library and
stubs for the executables the units name. Skipped where systemd-analyze is absent.
The protocol side (READY, STATUS, WATCHDOG over NOTIFY_SOCKET) is tested in
tests/unit/test_supervision.py and tests/integration/test_service_watchdog.py.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text())
    return cp


def _executables() -> set[str]:
    out = set()
    for name in SERVICES:
        for key in ("ExecStart", "ExecStartPre"):
            value = _unit(name)["Service"].get(key)
            if value:
                out.add(value.split()[0].lstrip("-@+!"))
    return out


def test_the_long_running_services_are_notify_with_watchdog_and_restart_policy() -> None:
    for name in ("edge-daemon.service", "cloud-sidecar.service"):
        svc = _unit(name)["Service"]
        assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
        assert int(svc["WatchdogSec"]) > 0
        assert svc["Restart"] == "on-failure"
        assert svc["RestartPreventExitStatus"] == "2"  # configuration errors: no restart loop


def test_secrets_arrive_as_credentials_and_devices_are_allow_listed() -> None:
    edge = (UNITS / "edge-daemon.service").read_text()
    cloud = (UNITS / "cloud-sidecar.service").read_text()
    assert "DeviceAllow=/dev/tpmrm0 rw" in edge and "DevicePolicy=closed" in edge
    assert re.search(r"^SupplementaryGroups=.*\baudio\b", edge, re.MULTILINE)
    assert "LoadCredential=claim:" in edge
    assert "LoadCredentialEncrypted=hsm-pin:" in cloud


@needs_analyze
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_scores_at_most_2_0_exposure(service: str) -> None:
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNITS / service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout


def verify_root(root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify --root` on every unit of systemd/ installed under ``root``."""
    assert ANALYZE is not None
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".timer"))
    return subprocess.run(
        [ANALYZE, "verify", f"--root={root}", "--no-pager", *names],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    lib = Path("/usr/lib/systemd/system")
    if not (lib / "sysinit.target").exists():
        pytest.skip("the host has no systemd unit library to verify against")
    shutil.copytree(lib, tmp_path / "usr/lib/systemd/system", symlinks=True)
    etc = tmp_path / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".timer"):
            shutil.copy(unit, etc / unit.name)
    for exe in _executables():
        stub = tmp_path / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    out = verify_root(tmp_path)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
