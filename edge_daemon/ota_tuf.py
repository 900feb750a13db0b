"""The device's TUF update client: python-tuf's ``ngclient`` behind our fetcher and policy.

Owns ``<state>/ota/tuf/`` (trusted metadata: ``root.json``, ``timestamp.json``,
``snapshot.json``, ``targets.json``, each written temp → fsync → rename),
``<state>/ota/floor.json`` (the rollback floor, sealed by ``ota_state``) and
``<state>/ota/staging/`` (verified artifacts, named ``<sha256>.<name>``).
``bootstrap`` writes the three sealed state files (floor, clock, failure ledger)
before the first trusted root, so that from then on a missing one reads as tampered.

What python-tuf's ``Updater`` checks (the TUF client workflow, its trusted metadata set):
root chain with thresholds and key rotation (fast-forward recovery included), expiry
(freeze), version rollback of every role, snapshot/targets consistency (mix-and-match),
byte caps on every file (endless data), length and hash of the artifact. Its reference
time is our ``TrustedClock`` (``ota_clock``), not the bare system clock.

What this module adds (device policy, each refusal with a ``reason``):

- a target name must be one safe path component (``bad_path``): no ``/``, no ``..``;
- ``custom`` must name this device's base model (``wrong_base_model``) and the adapter
  format this build reads (``wrong_format``), an integer ``adapter_version``;
- the target's ``cohort`` is ``all`` or a group the signed ``fleet-groups.json`` puts
  this device in (``not_in_group``), and no adapter above the release pin of its group
  is chosen (``pinned``);
- the device's rollout bucket (``fleet_protocol.ota.rollout_bucket`` of its id) must be
  below the target's signed ``rollout_percent``: the device learns whether it is in the
  cohort from signed metadata, not from its own configuration;
- a target whose ``custom`` names golden clips (``golden_target``) must name a target
  of the same metadata whose ``custom.golden_for`` is this adapter, within
  ``MAX_GOLDEN_BYTES``, with an integer ``golden_min_percent`` in 0..100 (``bad_golden``); the
  golden clips are downloaded and verified like the adapter (``download_golden``);
- the rollback floor is the highest ``adapter_version`` of an eligible target in any
  *verified* targets metadata, not the highest applied one; nothing below it is chosen;
- when the floor or the clock file is tampered (``ota_state``), every check is refused
  (``ota_state_tampered``) before any metadata is fetched.

Invariants: nothing that failed verification is persisted (ngclient persists a role
only after verifying it); the floor never decreases; an artifact appears in
``staging/`` only after its length and hash matched the signed targets metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from edge_daemon.errors import OtaRefusedError, OtaTransferError
from edge_daemon.ota_clock import TrustedClock
from edge_daemon.ota_state import TAMPERED, SealedFile
from fleet_model.golden import MAX_GOLDEN_BYTES
from fleet_protocol.io.files import write_atomic
from fleet_protocol.ota import rollout_bucket

log = logging.getLogger(__name__)

METADATA_URL = "mqtt://ota/metadata/"
TARGETS_URL = "mqtt://ota/targets/"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
GROUPS_TARGET = "fleet-groups.json"  # signed groups and release pins (cloud_sidecar.tuf_repo)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TufLimits:
    """Byte caps on every untrusted read (ngclient's ``UpdaterConfig``) and root rotations."""

    root_max_bytes: int = 64 * 1024
    timestamp_max_bytes: int = 4 * 1024
    snapshot_max_bytes: int = 64 * 1024
    targets_max_bytes: int = 512 * 1024
    artifact_max_bytes: int = 16 * 1024 * 1024
    max_root_rotations: int = 32


@dataclass(frozen=True)
class AdapterTarget:
    name: str
    length: int
    sha256: str
    base_model_sha256: str
    adapter_format: str
    adapter_version: int
    rollout_percent: int
    golden: str = ""  # the signed golden clips target the shadow check runs ("" for none)
    golden_sha256: str = ""
    golden_min_accuracy: float = 0.0


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class CheckResult:
    targets_version: int
    chosen: AdapterTarget | None
    skipped: tuple[Skipped, ...]


def refusal_reason(e: Exception) -> str:
    """The status ``reason`` of a python-tuf failure."""
    if isinstance(e, tuf_errors.BadVersionNumberError):
        return "rollback"
    if isinstance(e, tuf_errors.ExpiredMetadataError):
        return "expired"
    if isinstance(e, tuf_errors.UnsignedMetadataError):
        return "bad_signature"
    if isinstance(e, tuf_errors.LengthOrHashMismatchError):
        return "bad_hash"
    if isinstance(e, tuf_errors.DownloadLengthMismatchError):
        return "too_large"
    return "bad_metadata"


def _custom(info: TargetFile) -> dict[str, Any]:
    return info.custom if isinstance(info.custom, dict) else {}


class _FsyncUpdater(Updater):
    """``Updater`` whose trusted metadata is written temp → fsync → rename (power loss)."""

    def _persist_metadata(self, rolename: str, data: bytes) -> None:
        write_atomic(Path(self._dir) / f"{parse.quote(rolename, '')}.json", data, 0o644)


class TufUpdateClient:
    def __init__(
        self,
        state_dir: Path,
        fetcher: FetcherInterface,
        *,
        device_id: str,
        base_sha256: str,
        adapter_format: str,
        clock: TrustedClock,
        state_key: bytes,
        limits: TufLimits = TufLimits(),
    ) -> None:
        self.dir = state_dir / "ota"
        self._floor_file = SealedFile(self.dir / "floor.json", state_key)
        self._ledger_file = SealedFile(self.dir / "failures.json", state_key)
        self.metadata_dir = self.dir / "tuf"
        self.staging_dir = self.dir / "staging"
        self._fetcher = fetcher
        self._device = device_id
        self._base_sha = base_sha256
        self._format = adapter_format
        self.clock = clock
        self._limits = limits
        self._updater: Updater | None = None
        self._infos: dict[str, TargetFile] = {}

    # ----------------------------------------------------------- trust anchor

    def bootstrap(self, root_bytes: bytes) -> None:
        """Install the root shipped in the image as the first trusted root (once)."""
        path = self.metadata_dir / "root.json"
        if path.exists():
            return
        from tuf.api.metadata import Metadata

        try:
            md = Metadata[Root].from_bytes(root_bytes)
            md.verify_delegate(Root.type, md)  # self-signed by its threshold
        except Exception as e:
            raise OtaRefusedError(f"bootstrap root does not verify: {e}", "bad_root") from e
        # sealed state first: once the root exists, a missing state file is tampered
        self._floor_file.ensure({"adapter_version": 0})
        self._ledger_file.ensure({})
        self.clock.ensure_persisted()
        write_atomic(path, root_bytes, 0o644)

    def tampered(self) -> str:
        """Why the floor or the clock on the card is not trusted ("" when both are)."""
        self._floor_file.load()
        return self._floor_file.tampered or self.clock.tampered

    @property
    def floor(self) -> int:
        body = self._floor_file.load()
        if body is None:
            return 0  # first boot; a tampered file stops check() before the floor is used
        version = body.get("adapter_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            self._floor_file.tampered = "adapter_version is not a version"
            return 0
        return version

    def _raise_floor(self, version: int) -> None:
        if version > self.floor and not self._floor_file.tampered:
            self._floor_file.save({"adapter_version": version})

    # ------------------------------------------------------------------- check

    def check(self, installed_version: int) -> CheckResult:
        """Refresh the metadata and pick the update for this device, if any.

        Raises ``OtaRefusedError`` (a verification failure, or ``ota_state_tampered``
        when the floor or clock file failed its MAC) or ``OtaTransferError`` (the
        metadata could not be fetched).
        """
        why = self.tampered()
        if why:
            raise OtaRefusedError(f"OTA state on the card not trusted: {why}", TAMPERED)
        cfg = UpdaterConfig(
            max_root_rotations=self._limits.max_root_rotations,
            root_max_length=self._limits.root_max_bytes,
            timestamp_max_length=self._limits.timestamp_max_bytes,
            snapshot_max_length=self._limits.snapshot_max_bytes,
            targets_max_length=self._limits.targets_max_bytes,
        )
        try:
            updater = _FsyncUpdater(
                str(self.metadata_dir),
                METADATA_URL,
                str(self.staging_dir),
                TARGETS_URL,
                fetcher=self._fetcher,
                config=cfg,
            )
        except (OSError, tuf_errors.RepositoryError) as e:
            raise OtaRefusedError(f"trusted root unusable: {e}", "bad_root") from e
        # ngclient reads the wall clock once; the device's clock policy replaces it
        updater._trusted_set.reference_time = self.clock.now()
        try:
            updater.refresh()
        except tuf_errors.DownloadLengthMismatchError as e:
            raise OtaRefusedError(str(e), "too_large") from e
        except tuf_errors.RepositoryError as e:
            raise OtaRefusedError(str(e), refusal_reason(e)) from e
        except tuf_errors.DownloadError as e:
            raise OtaTransferError(f"metadata fetch failed: {e}") from e
        trusted = updater._trusted_set  # holds Signed objects (python-tuf >= 3)
        self.clock.observe_timestamp(trusted.timestamp.expires)
        targets = trusted.targets
        self._updater = updater
        groups, pin = self._groups(updater, targets.targets.get(GROUPS_TARGET))
        eligible: list[AdapterTarget] = []
        skipped: list[Skipped] = []
        for name, info in sorted(targets.targets.items()):
            if name == GROUPS_TARGET or _custom(info).get("golden_for"):
                continue  # not adapters: the groups document, an adapter's golden clips
            target, reason = self._admit(name, info, groups, targets.targets)
            if target is not None and pin is not None and target.adapter_version > pin:
                target, reason = None, "pinned"
            if target is None:
                skipped.append(Skipped(name, reason))
                continue
            eligible.append(target)
            self._infos[name] = info
            if target.golden:
                self._infos[target.golden] = targets.targets[target.golden]
        self._raise_floor(max((t.adapter_version for t in eligible), default=0))
        floor = self.floor
        chosen = None
        for t in eligible:
            if t.adapter_version < floor:
                skipped.append(Skipped(t.name, "rollback"))
            elif t.adapter_version > installed_version and (
                chosen is None or t.adapter_version > chosen.adapter_version
            ):
                chosen = t
        for s in skipped:
            log.info("OTA target %s skipped: %s", s.name[:64], s.reason)
        return CheckResult(targets.version, chosen, tuple(skipped))

    def _groups(self, updater: Updater, info: TargetFile | None) -> tuple[set[str], int | None]:
        """This device's groups and release pin, from the signed ``fleet-groups.json``."""
        if info is None:
            return set(), None
        if info.length > self._limits.targets_max_bytes:
            raise OtaRefusedError("the groups document is too large", "too_large")
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = self.staging_dir / f"{info.hashes.get('sha256', 'x')}.{GROUPS_TARGET}"
        if not path.exists():
            try:
                updater.download_target(info, filepath=str(path))
            except tuf_errors.RepositoryError as e:
                path.unlink(missing_ok=True)
                raise OtaRefusedError(str(e), refusal_reason(e)) from e
            except tuf_errors.DownloadError as e:
                path.unlink(missing_ok=True)
                raise OtaTransferError(f"groups fetch failed: {e}") from e
        try:
            doc = json.loads(path.read_bytes())
            mine = {g for g, members in doc["groups"].items() if self._device in members}
            pins = [int(doc["pins"][g]) for g in mine if g in doc["pins"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OtaRefusedError(f"groups document unreadable: {e}", "bad_metadata") from e
        return mine, (min(pins) if pins else None)

    def _admit(
        self,
        name: str,
        info: TargetFile,
        groups: set[str] = frozenset(),  # type: ignore[assignment]
        all_targets: dict[str, TargetFile] | None = None,
    ) -> tuple[AdapterTarget | None, str]:
        custom: Any = _custom(info)
        golden, golden_info = custom.get("golden_target", ""), None
        min_pct = custom.get("golden_min_percent", 0)
        if isinstance(golden, str) and golden and all_targets is not None:
            golden_info = all_targets.get(golden)
        golden_ok = golden == "" or (
            golden_info is not None
            and SAFE_NAME.fullmatch(golden) is not None
            and _custom(golden_info).get("golden_for") == name
            and golden_info.length <= MAX_GOLDEN_BYTES
            and _HEX64.fullmatch(str(golden_info.hashes.get("sha256", ""))) is not None
            and isinstance(min_pct, int)
            and not isinstance(min_pct, bool)
            and 0 <= min_pct <= 100
        )
        version = custom.get("adapter_version")
        percent = custom.get("rollout_percent", 100)
        sha = str(info.hashes.get("sha256", ""))
        well_formed = (
            isinstance(version, int)
            and not isinstance(version, bool)
            and version >= 1
            and isinstance(percent, int)
            and 0 <= percent <= 100
            and _HEX64.fullmatch(sha) is not None
        )
        checks = (  # the first failing check names the refusal
            (SAFE_NAME.fullmatch(name) is not None and ".." not in name, "bad_path"),
            (well_formed, "bad_metadata"),
            (custom.get("base_model_sha256") == self._base_sha, "wrong_base_model"),
            (custom.get("adapter_format") == self._format, "wrong_format"),
            (info.length <= self._limits.artifact_max_bytes, "too_large"),
            (custom.get("cohort", "all") in ("all", *groups), "not_in_group"),
            (well_formed and rollout_bucket(self._device) < percent, "not_in_cohort"),
            (golden_ok, "bad_golden"),
        )
        for ok, reason in checks:
            if not ok:
                return None, reason
        target = AdapterTarget(
            name, info.length, sha, self._base_sha, self._format, int(version), int(percent),
            golden, str(golden_info.hashes["sha256"]) if golden_info else "", int(min_pct) / 100,
        )  # fmt: skip
        return target, ""

    # ---------------------------------------------------------------- download

    def download(self, target: AdapterTarget) -> Path:
        """Fetch ``target`` (chosen by the last ``check``), verify it, keep it in staging/."""
        return self._fetch(target.name, target.sha256)

    def download_golden(self, target: AdapterTarget) -> Path | None:
        """Fetch and verify ``target``'s golden clips (``None`` when it names none)."""
        return self._fetch(target.golden, target.golden_sha256) if target.golden else None

    def _fetch(self, name: str, sha256: str) -> Path:
        if self._updater is None or name not in self._infos:
            raise OtaRefusedError("download before check", "not_checked")
        final = self.staging_dir / f"{sha256}.{name}"
        if final.exists():
            return final
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        part = self.staging_dir / f".{sha256}.download"
        try:
            self._updater.download_target(self._infos[name], filepath=str(part))
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, final)
        except tuf_errors.DownloadLengthMismatchError as e:
            raise OtaRefusedError(str(e), "too_large") from e
        except tuf_errors.RepositoryError as e:
            raise OtaRefusedError(str(e), refusal_reason(e)) from e
        except tuf_errors.DownloadError as e:
            raise OtaTransferError(f"artifact fetch failed: {e}") from e
        finally:
            part.unlink(missing_ok=True)
        return final
