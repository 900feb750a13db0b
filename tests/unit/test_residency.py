"""Residency policy: EU regions by default; the sidecar refuses any endpoint outside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloud_sidecar.config import load_config
from cloud_sidecar.errors import ConfigError, ResidencyError
from cloud_sidecar.residency import EU_CLOUD_REGIONS, ResidencyPolicy

EU = ResidencyPolicy.eu_default()


@pytest.mark.parametrize(
    "region",
    ["eu-central-1", "eu-west-1", "europe-west4", "westeurope", "on-prem-de", "on-prem-fr-lyon1"],
)
def test_eu_regions_and_eu_on_prem_sites_are_allowed_by_default(region: str) -> None:
    assert EU.allows(region)


@pytest.mark.parametrize(
    "region",
    [
        "us-east-1",
        "eu-west-2",  # London
        "eu-central-2",  # Zurich
        "europe-west6",  # Zurich
        "uksouth",
        "on-prem-us",
        "on-prem-ch",
        "on-prem-DE",
        "EU-CENTRAL-1",
        "eu-central-1 ",
        "",
        "eu-" + "x" * 100,
    ],
)
def test_non_eu_or_malformed_regions_are_refused_by_default(region: str) -> None:
    assert not EU.allows(region)


def test_no_default_region_lies_in_the_uk_or_switzerland() -> None:
    assert not {"eu-west-2", "europe-west2", "eu-central-2", "europe-west6"} & EU_CLOUD_REGIONS


def test_check_names_the_first_offending_endpoint_and_its_region() -> None:
    with pytest.raises(ResidencyError, match=r"'hsm'.*'us-east-1'") as info:
        EU.check({"broker": "eu-west-1", "hsm": "us-east-1", "registry": "ap-south-1"})
    assert (info.value.endpoint, info.value.region) == ("hsm", "us-east-1")
    assert isinstance(info.value, ConfigError)


def test_explicit_allowed_list_replaces_the_default() -> None:
    only = ResidencyPolicy.only(["eu-west-1", "on-prem-nl"])
    assert only.allows("eu-west-1") and only.allows("on-prem-nl")
    assert not only.allows("eu-central-1") and not only.allows("on-prem-de")
    EU.check({})  # no endpoints: nothing to refuse


def _config(tmp_path: Path, **over: Any) -> Path:
    doc: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "region": "eu-central-1",
        "base_model_dir": str(tmp_path / "base"),
        "broker": {
            "host": "127.0.0.1",
            "port": 1,
            "ca_cert": "ca.pem",
            "client_cert": "c.pem",
            "client_key": "k.pem",
            "region": "on-prem-de",
        },
        "hsm": {"module": "/nonexistent.so", "token_label": "t", "region": "eu-west-1"},
    }
    for dotted, value in over.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "cloud.json"
    path.write_text(json.dumps(doc))
    return path


def test_config_inside_the_eu_loads(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path))
    assert set(cfg.endpoint_regions().values()) == {"on-prem-de", "eu-west-1", "eu-central-1"}


@pytest.mark.parametrize(
    ("field", "endpoint"),
    [
        ("broker__region", "broker (127.0.0.1:1)"),
        ("hsm__region", "hsm (token 't')"),
        ("region", "object store"),
    ],
)
def test_config_with_an_endpoint_outside_the_eu_is_refused_naming_it(
    tmp_path: Path, field: str, endpoint: str
) -> None:
    with pytest.raises(ResidencyError) as info:
        load_config(_config(tmp_path, **{field: "us-east-1"}))
    assert info.value.endpoint.startswith(endpoint)
    assert "us-east-1" in str(info.value)


def test_other_declared_endpoints_such_as_a_registry_are_checked(tmp_path: Path) -> None:
    path = _config(tmp_path, residency__other_endpoints={"model-registry": "us-west-2"})
    with pytest.raises(ResidencyError, match="model-registry"):
        load_config(path)


def test_config_without_a_region_for_an_endpoint_is_invalid(tmp_path: Path) -> None:
    path = _config(tmp_path)
    doc = json.loads(path.read_text())
    del doc["hsm"]["region"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"hsm\.region"):
        load_config(path)


def test_operator_can_narrow_the_allowed_set(tmp_path: Path) -> None:
    path = _config(tmp_path, residency__allowed_regions=["on-prem-de", "eu-central-1"])
    with pytest.raises(ResidencyError, match="hsm"):
        load_config(path)


def test_serve_exits_with_the_config_code_naming_the_offending_endpoint(tmp_path: Path) -> None:
    path = _config(tmp_path, broker__region="us-east-1")
    out = subprocess.run(
        [sys.executable, "-m", "cloud_sidecar", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "broker (127.0.0.1:1)" in out.stderr and "us-east-1" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the store
