"""The OTA repository: signed targets metadata plus artifacts, on disk and on the broker.

Layout of ``repo_dir``: ``metadata/targets.json`` (the current signed document),
``metadata/<version>.targets.json`` (every version kept), ``targets/<name>``
(artifacts, named by content hash). Publication puts the metadata and the artifact as
retained messages under ``fleet/v1/ota/<channel>/``. The signing key never leaves
the HSM: ``sign_digest`` is the HSM's.

Invariants: one writer at a time (``flock`` on ``.writer.lock``); versions only increase; an artifact is written before the metadata that
names it, and the metadata file is replaced atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_link
from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota, topics
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Publication:
    version: int
    target: ota.TargetInfo
    metadata: bytes
    artifact: bytes


class OtaRepository:
    def __init__(self, repo_dir: Path, channel: str) -> None:
        self.dir = repo_dir
        self.channel = channel
        (repo_dir / "metadata").mkdir(parents=True, exist_ok=True)
        (repo_dir / "targets").mkdir(parents=True, exist_ok=True)

    def current_version(self) -> int:
        path = self.dir / "metadata" / "targets.json"
        if not path.exists():
            return 0
        return int(json.loads(path.read_bytes())["signed"]["version"])

    def add_adapter(
        self,
        artifact: bytes,
        *,
        base_model_sha256: str,
        adapter_version: int,
        cohort: str,
        expires_days: int,
        keyid: str,
        sign_digest: Callable[[bytes], bytes],
    ) -> Publication:
        with open(self.dir / ".writer.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one writer: versions never repeat
            return self._add_locked(
                artifact,
                base_model_sha256,
                adapter_version,
                cohort,
                expires_days,
                keyid,
                sign_digest,
            )

    def _add_locked(
        self,
        artifact: bytes,
        base_model_sha256: str,
        adapter_version: int,
        cohort: str,
        expires_days: int,
        keyid: str,
        sign_digest: Callable[[bytes], bytes],
    ) -> Publication:
        sha = hashlib.sha256(artifact).hexdigest()
        name = f"adapter-v{adapter_version}-{sha[:16]}.safetensors"
        write_atomic(self.dir / "targets" / name, artifact, 0o644)
        target = ota.TargetInfo(
            name=name,
            length=len(artifact),
            sha256=sha,
            base_model_sha256=base_model_sha256,
            adapter_format=ADAPTER_FORMAT,
            cohort=cohort,
            adapter_version=adapter_version,
        )
        version = self.current_version() + 1
        metadata = ota.build_targets(
            version=version,
            expires=datetime.now(UTC) + timedelta(days=expires_days),
            targets=(target,),
            keyid=keyid,
            sign_digest=sign_digest,
        )
        write_atomic(self.dir / "metadata" / f"{version}.targets.json", metadata, 0o644)
        write_atomic(self.dir / "metadata" / "targets.json", metadata, 0o644)
        log.info("OTA repository: targets v%d names %s", version, name)
        return Publication(version, target, metadata, artifact)

    def next_adapter_version(self) -> int:
        return max((t.adapter_version for t in self.targets()), default=0) + 1

    def targets(self) -> list[ota.TargetInfo]:
        """Every target ever published, from the kept metadata versions (trusted: we signed them)."""
        out: dict[str, ota.TargetInfo] = {}
        for path in sorted((self.dir / "metadata").glob("*.targets.json")):
            signed = json.loads(path.read_bytes())["signed"]
            for name, t in signed["targets"].items():
                c = t["custom"]
                out[name] = ota.TargetInfo(
                    name,
                    t["length"],
                    t["hashes"]["sha256"],
                    c["base_model_sha256"],
                    c["adapter_format"],
                    c["cohort"],
                    c["adapter_version"],
                )
        return sorted(out.values(), key=lambda t: t.adapter_version)

    def roll_back(
        self,
        to_adapter_version: int,
        *,
        expires_days: int,
        keyid: str,
        sign_digest: Callable[[bytes], bytes],
    ) -> Publication:
        """Roll forward to a new, higher version that carries an earlier adapter.

        Devices only ever move to higher versions (rollback protection), so going back
        means publishing the old artifact again under the next adapter version.
        """
        known = self.targets()
        earlier = [t for t in known if t.adapter_version == to_adapter_version]
        if not earlier:
            raise ValueError(f"no published adapter has version {to_adapter_version}")
        old = earlier[0]
        artifact = (self.dir / "targets" / old.name).read_bytes()
        ota.verify_artifact(artifact, old)
        return self.add_adapter(
            artifact,
            base_model_sha256=old.base_model_sha256,
            adapter_version=self.next_adapter_version(),
            cohort=old.cohort,
            expires_days=expires_days,
            keyid=keyid,
            sign_digest=sign_digest,
        )

    def publish(self, pub: Publication, send: Callable[[str, bytes, bool], bool]) -> bool:
        """Retained artifact first, then the metadata that points at it."""
        ok = send(topics.ota_artifact(self.channel, pub.target.name), pub.artifact, True)
        return ok and send(topics.ota_metadata(self.channel, "targets"), pub.metadata, True)


def publish_via_broker(
    cfg: SidecarConfig, repo: OtaRepository, pub: Publication, client_id: str
) -> bool:
    """Publish ``pub`` as retained messages over the sidecar's own mTLS identity."""

    link = open_link(cfg, client_id)
    link.start(wait_s=15)
    try:
        return repo.publish(pub, lambda t, p, r: link.publish(t, p, qos=1, retain=r))
    finally:
        link.stop()
