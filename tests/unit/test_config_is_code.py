"""Config is code (issue 9): what the sidecar config may make the process load, run or allow.

Files in temp dirs, no HSM: the module checks run before anything is loaded. The HSM
PIN policy with a real SoftHSM token is in tests/integration/test_insider_identity.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cloud_sidecar.config import HsmConfig, load_config
from cloud_sidecar.connect import open_hsm
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.trust import check_hook, check_hsm_env, check_pkcs11_module


def _config(tmp_path: Path, **residency: Any) -> Path:
    doc: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "region": "eu-central-1",
        "base_model_dir": str(tmp_path / "base"),
        "broker": {
            "ca_cert": "ca.pem",
            "client_cert": "c.pem",
            "client_key": "k.pem",
            "region": "eu-central-1",
        },
        "hsm": {"module": "/usr/lib/x.so", "token_label": "t", "region": "eu-west-1"},
    }
    if residency:
        doc["residency"] = residency
    path = tmp_path / "cloud.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o640)
    return path


def test_a_config_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path)
    load_config(path)
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_config(path)


def test_a_config_in_a_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    path = _config(d)
    d.chmod(0o777)
    with pytest.raises(ConfigError, match="directory anyone may write"):
        load_config(path)
    d.chmod(0o1777)  # sticky (like /tmp): others cannot replace our file
    load_config(path)


def test_a_residency_policy_wider_than_the_built_in_eu_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only narrow the built-in EU list"):
        load_config(_config(tmp_path, allowed_regions=["eu-central-1", "us-east-1"]))
    load_config(_config(tmp_path, allowed_regions=["eu-central-1", "eu-west-1"]))


def _module(d: Path, mode: int = 0o644) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    m = d / "libp11.so"
    m.write_bytes(b"\x7fELF")
    m.chmod(mode)
    return m


def test_only_allow_listed_trusted_pkcs11_modules_load(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    good = _module(lib)
    assert check_pkcs11_module(good, [lib]) == good.resolve()
    evil = _module(tmp_path / "evil")
    with pytest.raises(ConfigError, match="not under an allowed path"):
        check_pkcs11_module(evil, [lib])
    (lib / "link.so").symlink_to(evil)  # a link inside the allowed tree pointing out
    with pytest.raises(ConfigError, match="not under an allowed path"):
        check_pkcs11_module(lib / "link.so", [lib])
    writable = _module(lib / "w", 0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_pkcs11_module(writable, [lib])
    with pytest.raises(ConfigError, match="absolute"):
        check_pkcs11_module(Path("libp11.so"), [lib])


def test_open_hsm_refuses_a_module_outside_the_allow_list_before_loading_it(
    tmp_path: Path,
) -> None:
    evil = _module(tmp_path / "evil")
    cfg = SimpleNamespace(
        hsm=HsmConfig(module=evil, token_label="t", pin_file=tmp_path / "pin", region="eu-west-1")
    )
    with pytest.raises(ConfigError, match=r"hsm\.module"):
        open_hsm(cfg)  # type: ignore[arg-type]


def test_the_module_environment_is_limited_to_vendor_config_variables() -> None:
    check_hsm_env({"SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf"})
    for var in ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH"):
        with pytest.raises(ConfigError, match=var):
            check_hsm_env({"SOFTHSM2_CONF": "x", var: "/tmp/evil"})
    before = os.environ.get("LD_PRELOAD")
    cfg = SimpleNamespace(
        hsm=HsmConfig(
            module=Path("/usr/lib/x.so"),
            token_label="t",
            env={"LD_PRELOAD": "/tmp/evil.so"},
            region="eu-west-1",
        )
    )
    with pytest.raises(ConfigError):
        open_hsm(cfg)  # type: ignore[arg-type]
    assert os.environ.get("LD_PRELOAD") == before  # nothing was set


def test_the_crl_hook_must_be_an_absolute_trusted_executable(tmp_path: Path) -> None:
    check_hook(())
    script = tmp_path / "reload"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    check_hook([str(script), "arg"])
    with pytest.raises(ConfigError, match="absolute"):
        check_hook(["reload-broker"])  # a $PATH lookup
    script.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_hook([str(script)])
    script.chmod(0o644)
    with pytest.raises(ConfigError, match="not an executable"):
        check_hook([str(script)])


def _fleet_config(tmp_path: Path, **fleet: Any) -> Path:
    path = _config(tmp_path)
    doc = json.loads(path.read_text())
    doc["fleet"] = {"ca_dir": str(tmp_path / "ca"), "ca_signer": "file", **fleet}
    path.write_text(json.dumps(doc))
    return path


def test_a_fleet_without_ek_cas_is_a_config_error_and_serve_exits_with_the_config_code(
    tmp_path: Path,
) -> None:
    from cloud_sidecar.__main__ import EXIT_CONFIG, main

    path = _fleet_config(tmp_path)
    with pytest.raises(ConfigError, match=r"fleet\.ek_ca_certs is empty"):
        load_config(path)
    assert main(["serve", "--config", str(path)]) == EXIT_CONFIG
    assert not (tmp_path / "data").exists()  # refused before anything was opened
    assert load_config(_fleet_config(tmp_path, ek_ca_certs=["ek-ca.pem"])).fleet is not None


def test_allowing_unattested_keys_is_logged_and_audited_when_the_fleet_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.fleet import open_fleet
    from cloud_sidecar.metrics import Metrics
    from cloud_sidecar.store import Store
    from devstack.pki import DevCA

    sidecar = DevCA.create(tmp_path / "ca").issue_client("cloud-sidecar")
    path = _fleet_config(tmp_path, allow_unattested_keys=True)
    doc = json.loads(path.read_text())
    doc["broker"]["client_cert"] = str(sidecar.cert)
    path.write_text(json.dumps(doc))
    cfg = load_config(path)
    store = Store(tmp_path / "store.sqlite3", "eu-central-1")
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    with caplog.at_level("WARNING", logger="cloud_sidecar.fleet"):
        open_fleet(cfg, store, audit, Metrics())
    assert "allow_unattested_keys" in caplog.text
    kinds = [
        json.loads(line)["kind"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()
    ]
    assert kinds == ["fleet.unattested_keys_allowed"]
    store.close()
