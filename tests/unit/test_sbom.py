"""The training environment's SBOM (cloud_sidecar.sbom): CycloneDX 1.6 from the library,
listing every installed distribution with its version, readable back by the library."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

from packageurl import PackageURL

from cloud_sidecar.sbom import SBOM_FILE, read_sbom, write_sbom


def test_sbom_lists_every_installed_distribution_with_version_and_reads_back(
    tmp_path: Path,
) -> None:
    path = write_sbom(tmp_path, "training", "1.2.0")
    assert path.name == SBOM_FILE
    doc = json.loads(path.read_bytes())
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    assert doc["serialNumber"].startswith("urn:uuid:")
    assert doc["metadata"]["component"]["name"] == "training"
    listed = {c["purl"] for c in doc["components"]}
    for name in ("torch", "peft", "numpy", "onnxruntime", "cyclonedx-python-lib"):
        assert PackageURL(type="pypi", name=name, version=md.version(name)).to_string() in listed
    props = {p["name"]: p["value"] for p in doc["metadata"]["component"]["properties"]}
    assert props["sovereign-edge:torch"] == md.version("torch")
    record = [p for c in doc["components"] for p in c.get("properties", ())]
    assert len(record) >= len(doc["components"]) - 2  # RECORD hashes (an egg-link may lack one)
    assert all(len(p["value"]) == 64 for p in record if p["name"].endswith("record_sha256"))
    bom = read_sbom(path.read_bytes())
    assert len(bom.components) == len(doc["components"])


def test_the_same_environment_gives_the_same_components_and_serial(tmp_path: Path) -> None:
    docs = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        docs.append(json.loads(write_sbom(tmp_path / sub, "t", "1").read_bytes()))
    assert docs[0]["components"] == docs[1]["components"]
    assert docs[0]["serialNumber"] == docs[1]["serialNumber"]
