"""The TUF repository for adapter updates, built with python-tuf's Metadata API.

Owns ``repo_dir`` in the standard TUF layout with consistent snapshots, so that a stock
TUF client (python-tuf's ``ngclient.Updater``, go-tuf, ...) verifies it as it is:
``metadata/<N>.root.json`` (every root version kept), ``metadata/timestamp.json``,
``metadata/<N>.snapshot.json``, ``metadata/<N>.targets.json``,
``targets/<sha256>.<name>`` (artifacts, prefixed by their hash). ``export`` copies
exactly these files elsewhere; ``publish`` puts the metadata files on the broker as
retained messages (``fleet/v1/ota/<channel>/metadata/<file>``).

Roles: root is signed offline by a threshold of root keys (the operator guide
recommends 2 of 3, kept off-line; the demo keeps them as files); targets, snapshot and
timestamp are the online roles, each signed by its own key (threshold 1 each) that
never leaves the HSM (``cloud_sidecar.tuf_signer.HsmSigner``: SHA-256 in software,
``CKM_ECDSA`` in the token, because SoftHSM 2.6 has no ``CKM_ECDSA_SHA256``), so the
most exposed key, the timestamp's, signs no targets; ``rotate_root`` can replace any
one role's key (``new_online``). The timestamp expires soon
(``Expiry.timestamp``) and ``refresh_timestamp`` renews it (a timer runs
``cloud-sidecar ota refresh-timestamp``).

Each target carries ``length``, ``hashes.sha256`` and ``custom``: ``base_model_sha256``,
``adapter_format``, ``adapter_version`` (integer, the device's rollback floor),
``semver``, ``cohort`` and ``rollout_percent`` (the devices whose
``fleet_protocol.ota.rollout_bucket`` is below it take the update).

Invariants: one writer at a time (an exclusive ``flock`` on ``repo_dir/.writer.lock``
around every read-modify-write); every role's version strictly increases; an artifact
is written before the targets metadata that names it, targets before the snapshot that
names it, the snapshot before the timestamp; every file is written temp → fsync →
rename; target names are single safe path components (no ``/``, no ``..``); the three
online roles have three distinct keys, and a role is signed only by the key the current
root lists for it.

Imports python-tuf at module import: callers import this module lazily and treat
``ImportError`` as "TUF not installed" (``tuf`` is not in the lock yet, docs/adr/0016).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cloud_sidecar.errors import ConfigError
from fleet_protocol import topics
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
GROUPS_TARGET = "fleet-groups.json"
_SERIALIZER = JSONSerializer(compact=True)
OnlineSigners = Mapping[str, Signer]  # role name (ONLINE_ROLES) -> its signer


def check_online(online: OnlineSigners) -> dict[str, Signer]:
    """One signer per online role, three distinct keys."""
    if set(online) != set(ONLINE_ROLES):
        raise ConfigError(f"online signers for {sorted(online)}, need {sorted(ONLINE_ROLES)}")
    if len({s.public_key.keyid for s in online.values()}) != len(ONLINE_ROLES):
        raise ConfigError("each online role needs its own key")
    return dict(online)


@dataclass(frozen=True)
class Expiry:
    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=30)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(hours=24)


@dataclass(frozen=True)
class AdapterCustom:
    base_model_sha256: str
    adapter_format: str
    adapter_version: int
    cohort: str = "all"
    rollout_percent: int = 100
    golden_target: str = ""  # the golden clips (fleet_model.golden) the device runs first
    golden_min_percent: int = 0  # top-1 accuracy on them, percent (canonical JSON: no floats)

    def to_custom(self) -> dict[str, Any]:
        if not _HEX64.fullmatch(self.base_model_sha256):
            raise ConfigError("base_model_sha256 must be 64 lowercase hex characters")
        if self.adapter_version < 1:
            raise ConfigError("adapter_version must be positive")
        if not 0 <= self.rollout_percent <= 100:
            raise ConfigError("rollout_percent must be 0..100")
        if not 0 <= self.golden_min_percent <= 100:
            raise ConfigError("golden_min_percent must be 0..100")
        golden = (
            {"golden_target": self.golden_target, "golden_min_percent": self.golden_min_percent}
            if self.golden_target
            else {}
        )
        return golden | {
            "base_model_sha256": self.base_model_sha256,
            "adapter_format": self.adapter_format,
            "adapter_version": self.adapter_version,
            "semver": f"{self.adapter_version}.0.0",
            "cohort": self.cohort,
            "rollout_percent": self.rollout_percent,
        }


@dataclass(frozen=True)
class TargetPublication:
    name: str
    length: int
    sha256: str
    targets_version: int
    snapshot_version: int
    timestamp_version: int


class TufRepository:
    def __init__(
        self,
        repo_dir: Path,
        online: OnlineSigners | None,
        *,
        expiry: Expiry = Expiry(),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``online=None`` opens the repository read-only (export, publish, serve)."""
        self.dir = repo_dir
        self.metadata_dir = repo_dir / "metadata"
        self.targets_dir = repo_dir / "targets"
        self._online = check_online(online) if online is not None else None
        self._expiry = expiry
        self._now = now
        if not self.exists(repo_dir):
            raise ConfigError(f"no TUF repository at {repo_dir} (create it first)")

    # ---------------------------------------------------------------- creation

    @staticmethod
    def exists(repo_dir: Path) -> bool:
        return (repo_dir / "metadata" / "1.root.json").exists()

    @classmethod
    def create(
        cls,
        repo_dir: Path,
        *,
        root_signers: Sequence[Signer],
        root_threshold: int,
        online: OnlineSigners,
        expiry: Expiry = Expiry(),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> TufRepository:
        """Root v1 (signed by every root key) and empty targets, snapshot and timestamp v1."""
        if not 1 <= root_threshold <= len(root_signers):
            raise ConfigError(f"root threshold {root_threshold} of {len(root_signers)} keys")
        if cls.exists(repo_dir):
            raise ConfigError(f"a TUF repository already exists at {repo_dir}")
        (repo_dir / "metadata").mkdir(parents=True, exist_ok=True)
        (repo_dir / "targets").mkdir(parents=True, exist_ok=True)
        root = Root(expires=now() + expiry.root, consistent_snapshot=True)
        root.roles[Root.type] = Role([], root_threshold)
        for s in root_signers:
            root.add_key(s.public_key, Root.type)
        online = check_online(online)
        for role in ONLINE_ROLES:
            root.add_key(online[role].public_key, role)  # threshold 1 each
        md = Metadata(root)
        for s in root_signers:
            md.sign(s, append=True)
        write_atomic(repo_dir / "metadata" / "1.root.json", md.to_bytes(_SERIALIZER), 0o644)
        repo = cls(repo_dir, online, expiry=expiry, now=now)
        with repo._writer():
            repo._write_targets(Targets(expires=now() + expiry.targets))
        log.info(
            "TUF repository created at %s (root %d of %d)",
            repo_dir,
            root_threshold,
            len(root_signers),
        )
        return repo

    # ------------------------------------------------------------------ reading

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_file(str(self.metadata_dir / f"{self.root_version()}.root.json"))

    def root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")]
        return max(versions)

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return Metadata[Snapshot].from_file(str(self.metadata_dir / f"{version}.snapshot.json"))

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta[f"{Targets.type}.json"].version
        return Metadata[Targets].from_file(str(self.metadata_dir / f"{version}.targets.json"))

    def target_files(self) -> dict[str, TargetFile]:
        return dict(self.targets().signed.targets)

    def artifact(self, name: str) -> bytes:
        info = self.target_files()[name]
        return (self.targets_dir / f"{info.hashes['sha256']}.{name}").read_bytes()

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """The one-writer lock: every read-modify-write of the metadata runs inside it."""
        with open(self.dir / ".writer.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write(self, name: str, md: Metadata[Any]) -> bytes:
        data: bytes = md.to_bytes(_SERIALIZER)
        write_atomic(self.metadata_dir / name, data, 0o644)
        return data

    def _sign_online(self, md: Metadata[Any]) -> None:
        if self._online is None:
            raise ConfigError("this TUF repository was opened without its online signers")
        role = md.signed.type
        signer = self._online[role]
        if signer.public_key.keyid not in self.root().signed.roles[role].keyids:
            raise ConfigError(f"the {role} key is not the one root lists (rotate root first)")
        md.sign(signer)

    def _next_version(self, name: str, current: int) -> int:
        return current + 1 if (self.metadata_dir / name).exists() or current else 1

    def _write_targets(self, targets: Targets) -> TargetPublication:
        """targets → snapshot → timestamp, each a strictly higher version (writer lock held)."""
        had = (self.metadata_dir / "timestamp.json").exists()
        old_ts = self.timestamp().signed if had else None
        old_snap = self.snapshot().signed if had else None
        old_targets_version = (
            old_snap.meta[f"{Targets.type}.json"].version if old_snap is not None else 0
        )
        targets.version = old_targets_version + 1
        targets.expires = self._now() + self._expiry.targets
        t_md = Metadata(targets)
        self._sign_online(t_md)
        self._write(f"{targets.version}.targets.json", t_md)
        snap = Snapshot(
            version=(old_snap.version + 1) if old_snap else 1,
            expires=self._now() + self._expiry.snapshot,
            meta={f"{Targets.type}.json": MetaFile(version=targets.version)},
        )
        s_md = Metadata(snap)
        self._sign_online(s_md)
        self._write(f"{snap.version}.snapshot.json", s_md)
        ts = Timestamp(
            version=(old_ts.version + 1) if old_ts else 1,
            expires=self._now() + self._expiry.timestamp,
            snapshot_meta=MetaFile(version=snap.version),
        )
        ts_md = Metadata(ts)
        self._sign_online(ts_md)
        self._write("timestamp.json", ts_md)
        return TargetPublication("", 0, "", targets.version, snap.version, ts.version)

    def add_target(
        self, name: str, data: bytes, custom: AdapterCustom, golden: bytes | None = None
    ) -> TargetPublication:
        """Store the artifact, then name it in new targets, snapshot and timestamp versions.

        ``golden``: the golden clips, stored as the target ``custom.golden_target`` in the
        same targets version (its custom ``golden_for`` names the adapter)."""
        extra = {custom.golden_target: golden} if golden is not None else {}
        if (golden is None) != (not custom.golden_target):
            raise ConfigError("golden clips and golden_target go together")
        for n in (name, *extra):
            if not TARGET_NAME_RE.fullmatch(n) or ".." in n or n == GROUPS_TARGET:
                raise ConfigError(f"target name {n[:64]!r} is not one safe path component")
        fields = custom.to_custom()
        sha = hashlib.sha256(data).hexdigest()
        with self._writer():
            current = self.targets().signed
            used = [
                int(t.custom["adapter_version"])
                for t in current.targets.values()
                if isinstance(t.custom, dict) and "adapter_version" in t.custom
            ]
            if used and custom.adapter_version <= max(used):
                raise ConfigError(
                    f"adapter_version {custom.adapter_version} is not above {max(used)}"
                )
            for gname, gdata in extra.items():
                gsha = hashlib.sha256(gdata).hexdigest()
                write_atomic(self.targets_dir / f"{gsha}.{gname}", gdata, 0o644)
                ginfo = TargetFile.from_data(gname, gdata, ["sha256"])
                ginfo.unrecognized_fields["custom"] = {"golden_for": name}
                current.targets[gname] = ginfo
            write_atomic(self.targets_dir / f"{sha}.{name}", data, 0o644)
            info = TargetFile.from_data(name, data, ["sha256"])
            info.unrecognized_fields["custom"] = fields
            current.targets[name] = info
            pub = self._write_targets(current)
        log.info("TUF targets v%d names %s (%d bytes)", pub.targets_version, name, len(data))
        return TargetPublication(
            name, len(data), sha, pub.targets_version, pub.snapshot_version, pub.timestamp_version
        )

    def set_groups(self, groups: dict[str, list[str]], pins: dict[str, int]) -> TargetPublication:
        """Sign the fleet's groups and per-group release pins as the target ``fleet-groups.json``.

        Devices learn their group from it (signed), never from their own configuration;
        a device in a pinned group takes no adapter above the pinned version.
        """
        for group, members in groups.items():
            if not TARGET_NAME_RE.fullmatch(group) or not all(isinstance(m, str) for m in members):
                raise ConfigError(f"bad group {group[:64]!r}")
        if not all(g in groups and isinstance(v, int) and v >= 1 for g, v in pins.items()):
            raise ConfigError("every pin names a known group and a positive adapter version")
        data = json.dumps({"groups": groups, "pins": pins}, sort_keys=True).encode()
        sha = hashlib.sha256(data).hexdigest()
        with self._writer():
            current = self.targets().signed
            write_atomic(self.targets_dir / f"{sha}.{GROUPS_TARGET}", data, 0o644)
            info = TargetFile.from_data(GROUPS_TARGET, data, ["sha256"])
            info.unrecognized_fields["custom"] = {"kind": "groups"}
            current.targets[GROUPS_TARGET] = info
            pub = self._write_targets(current)
        return pub

    def set_rollout_percent(self, name: str, percent: int) -> TargetPublication:
        """Re-sign ``name`` with a new ``rollout_percent`` (widen, or 0 to withdraw it)."""
        if not 0 <= percent <= 100:
            raise ConfigError("rollout_percent must be 0..100")
        with self._writer():
            current = self.targets().signed
            info = current.targets.get(name)
            if (
                info is None
                or not isinstance(info.custom, dict)
                or "adapter_version" not in info.custom
            ):
                raise ConfigError(f"no adapter target {name[:64]!r}")
            info.unrecognized_fields["custom"] = {**info.custom, "rollout_percent": percent}
            pub = self._write_targets(current)
        log.info("TUF target %s at %d %% (targets v%d)", name, percent, pub.targets_version)
        return pub

    def roll_forward_to(self, failing: str) -> TargetPublication:
        """Withdraw ``failing`` and publish the adapter before it under the next version."""
        files = self.target_files()
        bad = files.get(failing)
        if bad is None or not isinstance(bad.custom, dict):
            raise ConfigError(f"no adapter target {failing[:64]!r}")
        earlier = [
            (int(t.custom["adapter_version"]), n)
            for n, t in files.items()
            if isinstance(t.custom, dict)
            and "adapter_version" in t.custom
            and int(t.custom["adapter_version"]) < int(bad.custom["adapter_version"])
            and t.custom.get("base_model_sha256") == bad.custom.get("base_model_sha256")
        ]
        if not earlier:
            raise ConfigError(f"no adapter before {failing[:64]!r} to roll forward to")
        _, name = max(earlier)
        old = files[name]
        version = self.next_adapter_version()
        self.set_rollout_percent(failing, 0)
        golden_name = str(old.custom.get("golden_target", ""))
        return self.add_target(
            f"v{version}-rollforward-{name}"[:128],
            self.artifact(name),
            AdapterCustom(
                old.custom["base_model_sha256"],
                old.custom["adapter_format"],
                version,
                str(old.custom.get("cohort", "all")),
                100,
                f"v{version}-{golden_name}"[:128] if golden_name else "",
                int(old.custom.get("golden_min_percent", 0)),
            ),
            self.artifact(golden_name) if golden_name else None,
        )

    def next_adapter_version(self) -> int:
        used = [
            int(t.custom["adapter_version"])
            for t in self.target_files().values()
            if isinstance(t.custom, dict) and "adapter_version" in t.custom
        ]
        return max(used, default=0) + 1

    def refresh_timestamp(self) -> int:
        """A new timestamp version with a fresh expiry (run by a timer well before it expires)."""
        with self._writer():
            old = self.timestamp().signed
            ts = Timestamp(
                version=old.version + 1,
                expires=self._now() + self._expiry.timestamp,
                snapshot_meta=old.snapshot_meta,
            )
            md = Metadata(ts)
            self._sign_online(md)
            self._write("timestamp.json", md)
        return int(ts.version)

    def rotate_root(
        self,
        *,
        old_signers: Sequence[Signer],
        new_signers: Sequence[Signer],
        threshold: int,
        new_online: OnlineSigners | None = None,
    ) -> int:
        """Root N+1, signed by the old root keys (a threshold of them) and every new one.

        ``new_online`` maps some online roles to new keys (one role, or all three); those
        roles move to them, and targets, snapshot and timestamp are re-signed at higher
        versions (a fast-forward recovery: a client that trusted a timestamp signed by a
        compromised key drops it on the rotation, python-tuf no longer verifies it).
        """
        with self._writer():
            root = self.root().signed
            for keyid in list(root.roles[Root.type].keyids):
                root.revoke_key(keyid, Root.type)
            root.roles[Root.type].threshold = threshold
            for s in new_signers:
                root.add_key(s.public_key, Root.type)
            if new_online is not None:
                if self._online is None or not set(new_online) <= set(ONLINE_ROLES):
                    raise ConfigError("rotating online keys needs the online signers")
                online = check_online({**self._online, **new_online})
                for role in new_online:
                    for keyid in list(root.roles[role].keyids):
                        root.revoke_key(keyid, role)
                    root.add_key(online[role].public_key, role)
            root.version += 1
            root.expires = self._now() + self._expiry.root
            md = Metadata(root)
            signed_by: set[str] = set()
            for s in [*old_signers, *new_signers]:
                if s.public_key.keyid not in signed_by:
                    md.sign(s, append=True)
                    signed_by.add(s.public_key.keyid)
            self._write(f"{root.version}.root.json", md)
            if new_online is not None:
                self._online = online
                self._write_targets(self.targets().signed)
        log.info("TUF root rotated to v%d (threshold %d)", root.version, threshold)
        return int(root.version)

    # ------------------------------------------------------- export and publish

    def files(self) -> list[Path]:
        """The current repository, relative to ``repo_dir``: every root, the current chain."""
        with self._writer():
            snap = self.snapshot()
            targets_version = snap.signed.meta[f"{Targets.type}.json"].version
            meta = sorted(
                self.metadata_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0])
            )
            meta += [
                self.metadata_dir / "timestamp.json",
                self.metadata_dir / f"{snap.signed.version}.snapshot.json",
                self.metadata_dir / f"{targets_version}.targets.json",
            ]
            targets = Metadata[Targets].from_file(
                str(self.metadata_dir / f"{targets_version}.targets.json")
            )
        arts = [
            self.targets_dir / f"{t.hashes['sha256']}.{n}"
            for n, t in targets.signed.targets.items()
        ]
        return [p.relative_to(self.dir) for p in [*meta, *arts]]

    def export(self, dest: Path) -> list[Path]:
        """Write the repository in the standard TUF layout under ``dest`` (files copied)."""
        out = []
        for rel in self.files():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.dir / rel, target)
            out.append(target)
        return out

    def publish_metadata(self, channel: str, send: Callable[[str, bytes, bool], bool]) -> bool:
        """Every current metadata file as a retained message; the timestamp last."""
        files = [p for p in self.files() if p.parts[0] == "metadata"]
        files.sort(key=lambda p: p.name == "timestamp.json")
        ok = True
        for rel in files:
            topic = topics.ota_tuf_metadata(channel, rel.name)
            ok = send(topic, (self.dir / rel).read_bytes(), True)
            if not ok:
                return False
        return ok
