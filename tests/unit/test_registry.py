"""The model registry: semantic versions, lineage, aliases, approvals, tamper checks,
and `cloud-sidecar registry list|show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sidecar.__main__ import EXIT_INPUT, EXIT_OK, main
from cloud_sidecar.errors import RegistryError
from cloud_sidecar.registry import BUNDLE_INDEX, BUNDLE_SIG, Registry, bundle_index

BASE_A, BASE_B = "a" * 64, "b" * 64


def _bundle(reg: Registry, version: str, payload: bytes = b"adapter") -> None:
    d = reg.bundle_dir(version)
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    (d / BUNDLE_INDEX).write_bytes(bundle_index(d))
    (d / BUNDLE_SIG).write_text("{}")


def _add(reg: Registry, base: str, parent: str = "base") -> str:
    v = reg.next_version(base)
    _bundle(reg, v)
    reg.add(v, {"base_sha256": base, "dataset_id": "d" * 64, "parent": parent})
    return v


def test_versions_bump_minor_on_the_same_base_and_major_on_a_new_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert [_add(reg, BASE_A), _add(reg, BASE_A), _add(reg, BASE_B), _add(reg, BASE_B)] == [
        "1.0.0", "1.1.0", "2.0.0", "2.1.0"
    ]  # fmt: skip
    assert reg.alias("candidate") == "2.1.0" and reg.alias("production") is None
    with pytest.raises(RegistryError):
        reg.bundle_dir("1.0")


def test_publishing_moves_an_alias_and_approvals_name_their_approver(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _add(reg, BASE_A)
    with pytest.raises(RegistryError, match="approver"):
        reg.approve(v, " ")
    rec = reg.approve(v, "A. Reviewer", "PR-7")
    assert rec["approver"] == "A. Reviewer" and rec["bundle_sha256"] == reg.get(v)["bundle_sha256"]
    reg.mark_published(v, "production", 3, "stable")
    entry = reg.get(v)
    assert entry["aliases"] == ["candidate", "production"]
    assert entry["published"][0]["ota_version"] == 3


def test_a_bundle_changed_after_signing_cannot_be_registered(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _bundle(reg, "1.0.0")
    (reg.bundle_dir("1.0.0") / "adapter" / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(RegistryError, match="changed after"):
        reg.add("1.0.0", {"base_sha256": BASE_A, "dataset_id": "d", "parent": "base"})


def test_registry_list_and_show_print_versions_aliases_and_lineage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    reg = Registry(data / "registry")
    _add(reg, BASE_A)
    cfg = tmp_path / "cloud.json"
    dummy = str(tmp_path / "x.pem")
    cfg.write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "region": "eu-central-1",
                "base_model_dir": str(tmp_path),
                "broker": {"ca_cert": dummy, "client_cert": dummy, "client_key": dummy,
                           "region": "on-prem-de"},
                "hsm": {"module": dummy, "token_label": "t", "region": "on-prem-de"},
            }
        )
    )  # fmt: skip
    assert main(["registry", "--config", str(cfg), "list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("1.0.0") and "candidate" in out and "parent=base" in out
    assert main(["registry", "--config", str(cfg), "show", "1.0.0"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["lineage"]["base_sha256"] == BASE_A
    assert main(["registry", "--config", str(cfg), "show", "9.9.9"]) == EXIT_INPUT
