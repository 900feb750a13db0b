"""The OTA repository: signed targets metadata plus artifacts, on disk and on the broker.

Layout of ``repo_dir``: ``metadata/targets.json`` (the current signed document),
``metadata/<version>.targets.json`` (every version kept), ``targets/<name>``
(artifacts, named by content hash). Publication puts the metadata and the artifact as
retained messages under ``fleet/v1/ota/<channel>/``. The signing key never leaves
the HSM: ``sign_digest`` is the HSM's.

Invariants: versions only increase; an artifact is written before the metadata that
names it, and the metadata file is replaced atomically.

Repository state lives in signed metadata only (issue 9): the current version, the
published targets, their hashes and what a rollback republishes are read from
``metadata/<n>.targets.json`` files whose signature by the trusted OTA key verifies
(``ota.verify_signed_targets``) and whose version is their file name's; an artifact is
republished only when its bytes match the signed target. A file that fails any check,
or a ``targets.json`` that is not the newest verified version, raises
``RepositoryError`` and nothing is signed: an insider who can write the directory can
stop publication, not steer it. A new document is verified against the trusted key
before it is written, so the HSM key that signed it is the one devices pin.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_link
from cloud_sidecar.errors import RepositoryError
from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

_VERSION_FILE = re.compile(r"^([1-9][0-9]{0,17})\.targets\.json$")


@dataclass(frozen=True)
class Publication:
    version: int
    target: ota.TargetInfo
    metadata: bytes
    artifact: bytes


class OtaRepository:
    def __init__(self, repo_dir: Path, channel: str, trusted_key_pem: bytes) -> None:
        """``trusted_key_pem``: the OTA signing key's public half (the HSM's, the one devices pin)."""
        self.dir = repo_dir
        self.channel = channel
        self._key = trusted_key_pem
        self._keyid = key_id_from_pem(trusted_key_pem)
        (repo_dir / "metadata").mkdir(parents=True, exist_ok=True)
        (repo_dir / "targets").mkdir(parents=True, exist_ok=True)

    def _verify(self, data: bytes, what: str) -> ota.VerifiedTargets:
        try:
            return ota.verify_signed_targets(
                data, trusted_key_pem=self._key, trusted_keyid=self._keyid
            )
        except ProtocolError as e:
            raise RepositoryError(f"{what} is not signed metadata: {e}") from e

    def history(self) -> list[ota.VerifiedTargets]:
        """Every kept metadata version, verified, oldest first; ``RepositoryError`` if any fails."""
        out: list[ota.VerifiedTargets] = []
        for path in (self.dir / "metadata").iterdir():
            if path.name == "targets.json":
                continue
            m = _VERSION_FILE.fullmatch(path.name)
            if m is None:
                raise RepositoryError(f"unexpected file in the metadata directory: {path.name}")
            verified = self._verify(path.read_bytes(), path.name)
            if verified.version != int(m.group(1)):
                raise RepositoryError(f"{path.name} holds version {verified.version}")
            out.append(verified)
        out.sort(key=lambda v: v.version)
        current = self.dir / "metadata" / "targets.json"
        if current.exists():
            head = self._verify(current.read_bytes(), "targets.json")
            if not out or head != out[-1]:
                raise RepositoryError("targets.json is not the newest signed version")
        elif out:
            raise RepositoryError("targets.json is missing")
        return out

    def current_version(self) -> int:
        history = self.history()
        return history[-1].version if history else 0

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
        if keyid != self._keyid:
            raise RepositoryError(f"signing key {keyid} is not the trusted OTA key {self._keyid}")
        history = self.history()
        version = (history[-1].version if history else 0) + 1
        published = [t.adapter_version for v in history for t in v.targets]
        if adapter_version <= max(published, default=0):
            raise RepositoryError(f"adapter version {adapter_version} is not above the published")
        sha = hashlib.sha256(artifact).hexdigest()
        name = f"adapter-v{adapter_version}-{sha[:16]}.safetensors"
        target = ota.TargetInfo(
            name=name,
            length=len(artifact),
            sha256=sha,
            base_model_sha256=base_model_sha256,
            adapter_format=ADAPTER_FORMAT,
            cohort=cohort,
            adapter_version=adapter_version,
        )
        metadata = ota.build_targets(
            version=version,
            expires=datetime.now(UTC) + timedelta(days=expires_days),
            targets=(target,),
            keyid=keyid,
            sign_digest=sign_digest,
        )
        signed = self._verify(metadata, "the new document")
        if signed.version != version or signed.targets != (target,):
            raise RepositoryError("the signed document does not say what was asked")
        write_atomic(self.dir / "targets" / name, artifact, 0o644)
        write_atomic(self.dir / "metadata" / f"{version}.targets.json", metadata, 0o644)
        write_atomic(self.dir / "metadata" / "targets.json", metadata, 0o644)
        log.info("OTA repository: targets v%d names %s", version, name)
        return Publication(version, target, metadata, artifact)

    def next_adapter_version(self) -> int:
        return max((t.adapter_version for t in self.targets()), default=0) + 1

    def targets(self) -> list[ota.TargetInfo]:
        """Every target ever published, from the verified metadata versions."""
        out: dict[str, ota.TargetInfo] = {}
        for verified in self.history():
            for t in verified.targets:
                out[t.name] = t
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
        means publishing the old artifact again under the next adapter version. The
        artifact's bytes must match the signed target (length and hash), else
        ``RepositoryError`` and nothing is signed.
        """
        known = self.targets()
        earlier = [t for t in known if t.adapter_version == to_adapter_version]
        if not earlier:
            raise ValueError(f"no published adapter has version {to_adapter_version}")
        old = earlier[0]
        try:
            artifact = (self.dir / "targets" / old.name).read_bytes()
            ota.verify_artifact(artifact, old)
        except (OSError, ProtocolError) as e:
            raise RepositoryError(f"the artifact of adapter v{to_adapter_version}: {e}") from e
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
    """Publish ``pub`` as retained messages as the OTA publisher (its own identity)."""

    link = open_link(cfg, client_id, ota_publisher=True)
    link.start(wait_s=15)
    try:
        return repo.publish(pub, lambda t, p, r: link.publish(t, p, qos=1, retain=r))
    finally:
        link.stop()
