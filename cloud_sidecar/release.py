"""Promotion: a named person approves a registered bundle; only then does it reach the OTA
channel (``cloud-sidecar release approve|publish``).

Invariants:
- approving and publishing are separate from training and from each other; each is
  written to the audit log with who did it, the version and the bundle's SHA-256;
- ``publish`` refuses (and audits the refusal) a version that no approver approved
  while ``ota.require_approval`` is set, and a bundle whose files changed since it was
  signed (``registry.verify_bundle``); nothing is signed for the OTA channel then;
- the artifact published is the bundle's ``edge-adapter.safetensors``: the bytes the
  gate judged; on the TUF path its golden clips (``golden-clips.bin``, signed with the
  bundle) go with it as their own target, with the accuracy a device must reach on them:
  the candidate's own accuracy there minus ``GOLDEN_TOLERANCE``. Publishing to every device moves the ``production`` alias (which the
  next run's gate compares against), to a canary cohort the ``canary`` alias.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from cloud_sidecar import ota_publish
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_hsm
from cloud_sidecar.errors import CloudError, RegistryError
from cloud_sidecar.ota_repo import OtaRepository, publish_via_broker
from cloud_sidecar.registry import GOLDEN_CLIPS, GOLDEN_CLIPS_META, Registry, verify_bundle
from fleet_model import ADAPTER_FORMAT

log = logging.getLogger(__name__)

GOLDEN_TOLERANCE = 0.1  # the device's int8 merge may differ from the gate's in a window or two


def golden_for(bundle: Path) -> tuple[bytes, int] | None:
    """The bundle's golden clips and the accuracy in percent a device must reach on them
    (``None``: a bundle from before golden clips)."""
    clips, meta = bundle / GOLDEN_CLIPS, bundle / GOLDEN_CLIPS_META
    if not clips.exists():
        return None
    try:
        accuracy = float(json.loads(meta.read_bytes())["accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{meta}: {e}") from e
    return clips.read_bytes(), max(0, math.floor((accuracy - GOLDEN_TOLERANCE) * 100 + 1e-9))


def approve(cfg: SidecarConfig, version: str, approver: str, note: str = "") -> dict[str, Any]:
    registry = Registry(cfg.data_dir / "registry")
    audit = cfg.open_audit()
    verify_bundle(registry.bundle_dir(version))
    record = registry.approve(version, approver, note)
    audit.append("release.approved", version, **record)
    return record


def check_publishable(cfg: SidecarConfig, version: str) -> dict[str, Any]:
    """The registry entry of ``version`` if it may be published; ``RegistryError`` if not."""
    registry = Registry(cfg.data_dir / "registry")
    audit = cfg.open_audit()
    try:
        entry = registry.get(version)
        sha = verify_bundle(registry.bundle_dir(version))
        if cfg.ota.require_approval and not any(
            a["bundle_sha256"] == sha for a in entry["approvals"]
        ):
            raise RegistryError(
                f"version {version} has no approval; run `cloud-sidecar release approve"
                f" {version} --approver NAME` first"
            )
    except RegistryError as e:
        audit.append("release.refused", version, reason=str(e)[:300])
        raise
    return entry


def publish(
    cfg: SidecarConfig, version: str, *, cohort: str | None = None, broker: bool = True
) -> dict[str, Any]:
    """Sign ``version``'s edge artifact into the OTA repository and publish it."""
    entry = check_publishable(cfg, version)
    registry = Registry(cfg.data_dir / "registry")
    audit = cfg.open_audit()
    artifact = (registry.bundle_dir(version) / "edge-adapter.safetensors").read_bytes()
    cohort = cohort or cfg.ota.cohort
    hsm = open_hsm(cfg)
    try:
        repo = OtaRepository(cfg.ota_repo_dir, cfg.ota.channel, hsm.signing_public_key_pem())
        pub = repo.add_adapter(
            artifact,
            base_model_sha256=entry["lineage"]["base_sha256"],
            adapter_version=repo.next_adapter_version(),
            cohort=cohort,
            expires_days=cfg.ota.expires_days,
            keyid=hsm.signing_key_id(),
            sign_digest=hsm.sign_digest,
        )
        tuf_pub = None
        if ota_publish.tuf_available():  # the TUF repository beside it (docs/adr/0016)
            tuf_pub = ota_publish.add_adapter(
                cfg,
                hsm,
                pub.target.name,
                artifact,
                base_model_sha256=entry["lineage"]["base_sha256"],
                adapter_format=ADAPTER_FORMAT,
                adapter_version=pub.target.adapter_version,
                golden=golden_for(registry.bundle_dir(version)),
            )
    finally:
        hsm.close()
    audit.append(
        "ota.signed", version, version_ota=pub.version, target=pub.target.name,
        sha256=pub.target.sha256,
    )  # fmt: skip
    if tuf_pub is not None:
        audit.append(
            "ota.tuf_signed", version, targets_version=tuf_pub.targets_version,
            timestamp_version=tuf_pub.timestamp_version, target=tuf_pub.name,
        )  # fmt: skip
    if broker:
        if not publish_via_broker(cfg, repo, pub, f"cloud-sidecar-release-{version}"):
            raise CloudError("the broker did not acknowledge the OTA publication")
        audit.append("ota.published", version, version_ota=pub.version, channel=cfg.ota.channel)
        if tuf_pub is not None and not ota_publish.publish_metadata(
            cfg, f"cloud-sidecar-tuf-{version}"
        ):
            raise CloudError("the broker did not acknowledge the TUF metadata publication")
    alias = "production" if cohort == "all" else "canary"
    registry.mark_published(version, alias, pub.version, cfg.ota.channel)
    audit.append("release.published", version, alias=alias, cohort=cohort, broker=broker)
    return {
        "version": version,
        "alias": alias,
        "ota_version": pub.version,
        "tuf_repo_dir": str(ota_publish.tuf_repo_dir(cfg)) if tuf_pub is not None else "",
        "adapter_version": pub.target.adapter_version,
        "published": broker,
    }
