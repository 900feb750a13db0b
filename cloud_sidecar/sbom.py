"""The training environment's SBOM: CycloneDX 1.6 JSON, built with cyclonedx-python-lib.

Owns ``sbom.cdx.json`` in every bundle (``cloud_sidecar.train``): one component per
Python distribution installed in the interpreter that trained the adapter (name,
version, PyPI package URL, license where the metadata declares one), and the training
environment itself as the BOM's subject (Python, platform, torch build). Invariants:

- the document comes from the library's own serializer, never hand-written JSON;
- hashes: a distribution installed from an archive whose hash pip recorded
  (``direct_url.json`` ``archive_info.hashes``) carries that hash; every distribution
  carries the SHA-256 of its ``RECORD`` file (which lists the SHA-256 of every installed
  file) as the property ``sovereign-edge:record_sha256``, since pip does not keep the
  hash of the wheel it installed from an index;
- the file is part of the bundle, so ``bundle.json`` hashes it and the HSM's signature
  over ``bundle.json`` covers it (``cloud_sidecar.registry``);
- components are sorted and the serial number is derived from the component list, so
  the same environment gives the same document apart from the timestamp.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform
import sys
import uuid
from pathlib import Path
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

SBOM_FILE = "sbom.cdx.json"
SPEC_VERSION = "1.6"
_HASH_ALGS = {"sha256": HashAlgorithm.SHA_256, "sha512": HashAlgorithm.SHA_512}


def _archive_hashes(dist: md.Distribution) -> list[HashType]:
    text = dist.read_text("direct_url.json")
    if not text:
        return []
    try:
        info: dict[str, Any] = json.loads(text).get("archive_info", {})
    except ValueError:
        return []
    hashes = dict(info.get("hashes") or {})
    if "hash" in info and "=" in str(info["hash"]):
        alg, _, value = str(info["hash"]).partition("=")
        hashes.setdefault(alg, value)
    return [HashType(alg=_HASH_ALGS[a], content=v) for a, v in hashes.items() if a in _HASH_ALGS]


def _license(dist: md.Distribution) -> list[LicenseExpression]:
    expr = str(dist.metadata.json.get("license_expression", "")).strip()
    return [LicenseExpression(expr)] if expr and len(expr) < 200 else []


def _component(dist: md.Distribution) -> Component | None:
    name = str(dist.metadata.json.get("name", ""))
    version = dist.version
    if not name or not version:
        return None
    props = []
    record = dist.read_text("RECORD")
    if record is not None:
        digest = hashlib.sha256(record.encode()).hexdigest()
        props.append(Property(name="sovereign-edge:record_sha256", value=digest))
    norm = name.lower().replace("_", "-").replace(".", "-")
    return Component(
        type=ComponentType.LIBRARY,
        name=name,
        version=version,
        purl=PackageURL(type="pypi", name=norm, version=version),
        bom_ref=f"pypi:{norm}@{version}",
        hashes=_archive_hashes(dist),
        licenses=_license(dist),
        properties=props,
    )


def environment_components() -> list[Component]:
    """One component per installed distribution of this interpreter, sorted by name."""
    seen: dict[str, Component] = {}
    for dist in md.distributions():
        comp = _component(dist)
        if comp is not None and comp.bom_ref.value not in seen:
            seen[str(comp.bom_ref.value)] = comp
    return [seen[k] for k in sorted(seen)]


def build_sbom(subject: str, subject_version: str, extra: dict[str, str] | None = None) -> bytes:
    """The CycloneDX JSON of this interpreter's environment, ``subject`` as its component."""
    components = environment_components()
    props = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        **(extra or {}),
    }
    subject_component = Component(
        type=ComponentType.APPLICATION,
        name=subject,
        version=subject_version,
        bom_ref=f"subject:{subject}@{subject_version}",
        properties=[Property(name=f"sovereign-edge:{k}", value=v) for k, v in props.items()],
    )
    meta = BomMetaData(component=subject_component)
    key = "\n".join(str(c.bom_ref.value) for c in components).encode()
    serial = uuid.UUID(bytes=hashlib.sha256(key).digest()[:16], version=4)
    bom = Bom(components=components, metadata=meta, serial_number=serial)
    # a flat graph: the environment holds every distribution (pip keeps no edges we trust)
    bom.register_dependency(subject_component, components)
    return JsonV1Dot6(bom).output_as_string(indent=1).encode()


def write_sbom(directory: Path, subject: str, subject_version: str) -> Path:
    """``directory/sbom.cdx.json`` for the training environment (torch build recorded)."""
    extra: dict[str, str] = {}
    try:
        import torch

        extra["torch"] = str(torch.__version__)
        extra["torch_cuda"] = str(torch.version.cuda or "none")
    except ImportError:  # pragma: no cover - the sidecar's training always has torch
        pass
    path = directory / SBOM_FILE
    path.write_bytes(build_sbom(subject, subject_version, extra))
    return path


def read_sbom(data: bytes) -> Bom:
    """Parse an SBOM back with the library (raises on a document it cannot read)."""
    bom: Bom = Bom.from_json(json.loads(data))  # type: ignore[attr-defined]
    return bom
