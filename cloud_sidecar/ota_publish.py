"""OTA publication glue for the sidecar: open the TUF repository, add, export, publish.

Owns ``<data_dir>/ota-tuf`` (the TUF repository, ``cloud_sidecar.tuf_repo``) and, in
development only, ``<data_dir>/ota-root-keys`` (the 2-of-3 root keys as files; in
production the root is signed off-line and this directory does not exist). Each online
role has its own HSM key (``keys.hsm.TUF_ROLE_LABELS``: ``tuf-targets``,
``tuf-snapshot``, ``tuf-timestamp``, through ``tuf_signer.HsmSigner``);
``rotate_online_key`` replaces one role's key in the HSM and in a new root.

python-tuf is optional until it is in the lock (docs/adr/0016): ``tuf_available()``
says whether it imports, and every other function imports the TUF modules lazily.

Invariants: the repository is created once (root v1 signed by every root key, threshold
2); nothing here signs with a key outside the HSM except the development root keys.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from cloud_sidecar.tuf_signer import FileRootKeys

    online = online_signers(hsm) if hsm else None
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


def online_signers(hsm: Hsm) -> dict[str, Any]:
    """One ``HsmSigner`` per online role, each over its own key in the token (looked up
    afresh: ``cloud-sidecar ota rotate-key`` in another process may have rotated one)."""
    from functools import partial

    from cloud_sidecar.keys.hsm import TUF_ROLE_LABELS
    from cloud_sidecar.tuf_signer import HsmSigner

    return {
        role: HsmSigner(hsm.public_key_pem(label, fresh=True), partial(hsm.sign_digest_with, label))
        for role, label in TUF_ROLE_LABELS.items()
    }


def rotate_online_key(cfg: SidecarConfig, hsm: Hsm, role: str) -> int:
    """A new HSM key for one online role, listed by a new root (development root keys).

    In production the new root is signed off-line by the root key holders; here the
    development keys in ``<data_dir>/ota-root-keys`` sign it. Returns the root version.
    """
    from cloud_sidecar.keys.hsm import TUF_ROLE_LABELS
    from cloud_sidecar.tuf_signer import FileRootKeys

    if role not in TUF_ROLE_LABELS:
        raise ConfigError(f"{role!r} is not an online role ({', '.join(TUF_ROLE_LABELS)})")
    repo = open_repository(cfg, hsm)
    keys = FileRootKeys(cfg.data_dir / "ota-root-keys", ROOT_KEYS)
    trusted = set(repo.root().signed.roles["root"].keyids)
    if not keys.dir.is_dir():
        raise ConfigError(f"no development root keys in {keys.dir}: sign the new root off-line")
    roots = keys.ensure()
    if not {s.public_key.keyid for s in roots} <= trusted:
        raise ConfigError(f"the keys in {keys.dir} are not the current root keys")
    hsm.rotate_key(TUF_ROLE_LABELS[role])
    signers = online_signers(hsm)
    return repo.rotate_root(
        old_signers=roots,
        new_signers=roots,
        threshold=ROOT_THRESHOLD,
        new_online={role: signers[role]},
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
    golden: tuple[bytes, int] | None = None,
) -> TargetPublication:
    """``golden``: the bundle's golden clips and the accuracy (percent) a device must reach."""
    from cloud_sidecar.tuf_repo import AdapterCustom

    repo = open_repository(cfg, hsm)
    golden_name = f"golden-v{adapter_version}.bin" if golden else ""
    custom = AdapterCustom(
        base_model_sha256, adapter_format, adapter_version, cfg.ota.cohort, rollout_percent,
        golden_name, golden[1] if golden else 0,
    )  # fmt: skip
    return repo.add_target(name, artifact, custom, golden[0] if golden else None)


def export(cfg: SidecarConfig, dest: Path) -> list[Path]:
    """The repository in the standard TUF layout under ``dest``."""
    return open_repository(cfg, None).export(dest)


def refresh_timestamp(cfg: SidecarConfig, hsm: Hsm) -> int:
    return open_repository(cfg, hsm).refresh_timestamp()


def publish_metadata(cfg: SidecarConfig, client_id: str) -> bool:
    """Every current metadata file as a retained message, as the OTA publisher."""
    repo = open_repository(cfg, None)
    link = open_link(cfg, client_id, ota_publisher=True)
    link.start(wait_s=15)
    try:
        return repo.publish_metadata(
            cfg.ota.channel, lambda t, p, r: link.publish(t, p, qos=1, retain=r)
        )
    finally:
        link.stop()


def rollout_command(cfg: SidecarConfig, command: str, target: str | None, steps: str | None) -> str:
    """``cloud-sidecar rollout start|status|step|pause|resume|abort``; returns the report."""
    from cloud_sidecar import rollout as ro
    from cloud_sidecar.audit import AuditLog
    from cloud_sidecar.connect import open_hsm
    from cloud_sidecar.store import Store

    path = cfg.data_dir / "rollout.json"
    audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
    if command == "groups":  # target: a JSON file {"groups": {name: [device]}, "pins": {name: v}}
        if target is None:
            raise ConfigError("rollout groups needs a JSON file")
        try:
            doc = json.loads(Path(target).read_bytes())
            groups, pins = dict(doc["groups"]), dict(doc.get("pins", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"groups file {target}: {e}") from e
        pub = _signed(cfg, lambda repo: repo.set_groups(groups, pins), open_hsm)
        audit.append("ota.rollout.groups", "fleet-groups", groups=sorted(groups), pins=pins)
        return f"groups {sorted(groups)} and pins {pins} signed in targets v{pub.targets_version}"
    current = ro.load(path)
    if command == "start":
        if target is None:
            raise ConfigError("rollout start needs a target name")
        info = open_repository(cfg, None).target_files().get(target)
        if info is None or not isinstance(info.custom, dict):
            raise ConfigError(f"no adapter target {target[:64]!r}")
        plan = tuple(int(x) for x in (steps or "10,50,100").split(","))
        if not plan or plan != tuple(sorted(plan)) or not 0 < plan[0] <= plan[-1] <= 100:
            raise ConfigError("steps must rise, within 1..100")
        current = ro.Rollout(target, int(info.custom["adapter_version"]), 0, "running", plan)
        _signed(cfg, lambda repo: repo.set_rollout_percent(target, current.percent), open_hsm)
        ro.save(path, current)
        audit.append("ota.rollout.start", target, percent=current.percent, steps=list(plan))
    if current is None:
        raise ConfigError("no rollout has been started")
    if command in ("pause", "resume"):
        if current.state in ("running", "paused"):
            current = replace(current, state="paused" if command == "pause" else "running")
            ro.save(path, current)
        audit.append(f"ota.rollout.{command}", current.target, state=current.state)
    store = Store(cfg.data_dir / "store.sqlite3", cfg.region)
    try:
        devices = store.active_device_ids()
    finally:
        store.close()
    audit_path = cfg.data_dir / "audit.jsonl"
    lines = audit_path.read_bytes().splitlines() if audit_path.exists() else []
    states = ro.device_states(lines)
    action, counts = ro.decide(current, devices, states)
    if command == "abort" or (command == "step" and action == "abort"):
        pub = _signed(cfg, lambda repo: repo.roll_forward_to(current.target), open_hsm)
        current = replace(current, state="aborted")
        ro.save(path, current)
        audit.append("ota.rollout.abort", current.target, roll_forward=pub.name, **counts)
    elif command == "step" and action in ("widen", "done"):
        current = ro.widened(current) if action == "widen" else replace(current, state="done")
        _signed(
            cfg, lambda repo: repo.set_rollout_percent(current.target, current.percent), open_hsm
        )
        ro.save(path, current)
        audit.append(f"ota.rollout.{action}", current.target, percent=current.percent, **counts)
    rows = [
        f"rollout {current.target} v{current.adapter_version}: {current.state}, "
        f"{current.percent} % (step {current.step + 1}/{len(current.steps)}); next: {action}",
        f"cohort {counts['cohort']:.0f}, reported {counts['reported']:.0f}, "
        f"confirmed {counts['confirmed']:.0f}, failed {counts['failed']:.0f}",
    ]
    for d in devices:
        s = states.get(d)
        rows.append(
            f"  {d}: {s.state if s else '-'} v{s.adapter_version if s else 0}"
            f"{' (' + s.reason + ')' if s and s.reason else ''}"
        )
    return "\n".join(rows)


def _signed(cfg: SidecarConfig, change: Any, open_hsm: Any) -> Any:
    hsm = open_hsm(cfg)
    try:
        return change(open_repository(cfg, hsm))
    finally:
        hsm.close()
