"""OTA publication glue for the sidecar: open the TUF repository, add, export, publish.

Owns ``<data_dir>/ota-tuf`` (the TUF repository, ``cloud_sidecar.tuf_repo``) and, in
development only, ``<data_dir>/ota-root-keys`` (the 2-of-3 root keys as files; in
production the root is signed off-line and this directory does not exist). The online
key is the HSM's OTA signing key (``tuf_signer.HsmSigner``).

python-tuf is optional until it is in the lock (docs/adr/0016): ``tuf_available()``
says whether it imports, and every other function imports the TUF modules lazily.

Invariants: the repository is created once (root v1 signed by every root key, threshold
2); nothing here signs with a key outside the HSM except the development root keys.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_link
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.keys.hsm import Hsm

if TYPE_CHECKING:
    from cloud_sidecar.tuf_repo import TargetPublication, TufRepository

log = logging.getLogger(__name__)

ROOT_THRESHOLD = 2
ROOT_KEYS = 3


def tuf_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("tuf", "securesystemslib"))


def tuf_repo_dir(cfg: SidecarConfig) -> Path:
    return cfg.data_dir / "ota-tuf"


def open_repository(cfg: SidecarConfig, hsm: Hsm | None) -> TufRepository:
    """The TUF repository; created on first use (development root keys) when ``hsm`` is given."""
    if not tuf_available():
        raise ConfigError("python-tuf is not installed (needed: tuf, securesystemslib)")
    from cloud_sidecar.tuf_repo import TufRepository
    from cloud_sidecar.tuf_signer import FileRootKeys, HsmSigner

    online = HsmSigner(hsm.signing_public_key_pem(), hsm.sign_digest) if hsm else None
    repo_dir = tuf_repo_dir(cfg)
    if TufRepository.exists(repo_dir):
        return TufRepository(repo_dir, online)
    if online is None:
        raise ConfigError(f"no TUF repository at {repo_dir} yet (train or `ota init` first)")
    keys = FileRootKeys(cfg.data_dir / "ota-root-keys", ROOT_KEYS)
    log.warning("creating TUF repository with development root keys in %s", keys.dir)
    return TufRepository.create(
        repo_dir, root_signers=keys.ensure(), root_threshold=ROOT_THRESHOLD, online=online
    )


def add_adapter(
    cfg: SidecarConfig,
    hsm: Hsm,
    name: str,
    artifact: bytes,
    *,
    base_model_sha256: str,
    adapter_format: str,
    adapter_version: int,
    rollout_percent: int = 100,
) -> TargetPublication:
    from cloud_sidecar.tuf_repo import AdapterCustom

    repo = open_repository(cfg, hsm)
    custom = AdapterCustom(
        base_model_sha256, adapter_format, adapter_version, cfg.ota.cohort, rollout_percent
    )
    return repo.add_target(name, artifact, custom)


def export(cfg: SidecarConfig, dest: Path) -> list[Path]:
    """The repository in the standard TUF layout under ``dest``."""
    return open_repository(cfg, None).export(dest)


def refresh_timestamp(cfg: SidecarConfig, hsm: Hsm) -> int:
    return open_repository(cfg, hsm).refresh_timestamp()


def publish_metadata(cfg: SidecarConfig, client_id: str) -> bool:
    """Every current metadata file as a retained message over the sidecar's mTLS identity."""
    repo = open_repository(cfg, None)
    link = open_link(cfg, client_id)
    link.start(wait_s=15)
    try:
        return repo.publish_metadata(
            cfg.ota.channel, lambda t, p, r: link.publish(t, p, qos=1, retain=r)
        )
    finally:
        link.stop()
