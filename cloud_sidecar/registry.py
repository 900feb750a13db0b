"""The model registry: every bundle that passed the gate, its lineage, approvals and aliases.

Layout of ``root`` (``data_dir/registry``): ``index.json`` (entries and aliases) and
``versions/<semver>/`` (one bundle each: the PEFT adapter, the edge artifact, the merged
int8 model the gate judged, ``gate.json``, the golden clips the devices run before they
switch (``golden-clips.bin`` + ``.json``: the candidate's accuracy on them),
``model_card.json`` + ``.md``, the dataset
manifest, ``bundle.json`` listing every file's SHA-256 and ``bundle.sig``, the HSM's
signature over ``bundle.json``).

Invariants:
- versions are semantic and only increase: a new base model bumps the major version,
  an adapter on the same base the minor; lineage records the base, the dataset and the
  parent adapter (the production version the candidate was judged against);
- aliases: ``candidate`` (the newest bundle that passed the gate), ``canary`` and
  ``production`` (what the OTA channel serves: set only by ``release publish``);
- an approval names its approver and is kept with the entry (and in the audit log);
- ``index.json`` is replaced atomically under an exclusive file lock, so two commands
  cannot lose each other's changes;
- ``verify_bundle`` re-hashes every file against ``bundle.json``: a bundle edited after
  signing is refused before it is published.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloud_sidecar.errors import RegistryError
from fleet_protocol.io.files import file_sha256, write_atomic

ALIASES = ("candidate", "canary", "production")
BUNDLE_INDEX, BUNDLE_SIG = "bundle.json", "bundle.sig"
# golden clips with their labels (fleet_model.golden) and the candidate's accuracy on them
GOLDEN_CLIPS, GOLDEN_CLIPS_META = "golden-clips.bin", "golden-clips.json"
MAX_INDEX_BYTES = 16 * 1024 * 1024


def _parse(version: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in version.split("."))
    except ValueError as e:
        raise RegistryError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)") from e
    return major, minor, patch


def bundle_index(bundle_dir: Path) -> bytes:
    """``bundle.json``: the SHA-256 of every file in the bundle (sorted, canonical)."""
    files = {
        p.relative_to(bundle_dir).as_posix(): file_sha256(p)
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_file() and p.name not in (BUNDLE_INDEX, BUNDLE_SIG)
    }
    return json.dumps({"files": files}, indent=1, sort_keys=True).encode()


def verify_bundle(bundle_dir: Path) -> str:
    """The SHA-256 of ``bundle.json`` if every file still matches it; ``RegistryError`` if not."""
    index = bundle_dir / BUNDLE_INDEX
    if not index.is_file() or not (bundle_dir / BUNDLE_SIG).is_file():
        raise RegistryError(f"{bundle_dir} is not a signed bundle")
    if bundle_index(bundle_dir) != index.read_bytes():
        raise RegistryError(f"{bundle_dir} changed after it was signed")
    return hashlib.sha256(index.read_bytes()).hexdigest()


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "versions").mkdir(parents=True, exist_ok=True)
        self._index = root / "index.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            write_atomic(self._index, json.dumps(data, indent=1, sort_keys=True).encode(), 0o640)

    def _read(self) -> dict[str, Any]:
        if not self._index.exists():
            return {"entries": {}, "aliases": {}}
        if self._index.stat().st_size > MAX_INDEX_BYTES:
            raise RegistryError(f"{self._index} exceeds {MAX_INDEX_BYTES} bytes")
        data: dict[str, Any] = json.loads(self._index.read_bytes())
        return data

    def bundle_dir(self, version: str) -> Path:
        _parse(version)
        return self.root / "versions" / version

    def entries(self) -> list[dict[str, Any]]:
        data = self._read()
        aliases = data["aliases"]
        out = []
        for v in sorted(data["entries"], key=_parse):
            e = dict(data["entries"][v])
            e["aliases"] = sorted(a for a, av in aliases.items() if av == v)
            out.append(e)
        return out

    def get(self, version: str) -> dict[str, Any]:
        for e in self.entries():
            if e["version"] == version:
                return e
        raise RegistryError(f"no version {version} in the registry")

    def alias(self, name: str) -> str | None:
        value = self._read()["aliases"].get(name)
        return None if value is None else str(value)

    def next_version(self, base_sha256: str) -> str:
        """The version a new bundle on ``base_sha256`` gets."""
        entries = self._read()["entries"]
        if not entries:
            return "1.0.0"
        newest = max(entries, key=_parse)
        major, minor, _ = _parse(newest)
        if entries[newest]["lineage"]["base_sha256"] != base_sha256:
            return f"{major + 1}.0.0"
        return f"{major}.{minor + 1}.0"

    def add(self, version: str, lineage: dict[str, Any], **details: Any) -> None:
        """Record the bundle already written to ``bundle_dir(version)``; alias ``candidate``."""
        sha = verify_bundle(self.bundle_dir(version))
        with self._locked() as data:
            if version in data["entries"]:
                raise RegistryError(f"version {version} is already registered")
            data["entries"][version] = {
                "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "lineage": lineage,
                "bundle_sha256": sha,
                "approvals": [],
                "published": [],
                **details,
            }
            data["aliases"]["candidate"] = version

    def approve(self, version: str, approver: str, note: str = "") -> dict[str, Any]:
        if not approver.strip():
            raise RegistryError("an approval needs the approver's name")
        with self._locked() as data:
            entry = data["entries"].get(version)
            if entry is None:
                raise RegistryError(f"no version {version} in the registry")
            record = {
                "approver": approver,
                "note": note,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "bundle_sha256": entry["bundle_sha256"],
            }
            entry["approvals"].append(record)
        return record

    def mark_published(self, version: str, alias: str, ota_version: int, channel: str) -> None:
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}; one of {ALIASES}")
        with self._locked() as data:
            entry = data["entries"].get(version)
            if entry is None:
                raise RegistryError(f"no version {version} in the registry")
            entry["published"].append(
                {
                    "alias": alias,
                    "ota_version": ota_version,
                    "channel": channel,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            data["aliases"][alias] = version
