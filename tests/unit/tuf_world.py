"""A TUF repository and a device client wired through an in-memory fetcher (tests only).

The repository is the real ``cloud_sidecar.tuf_repo.TufRepository``; the online key is a
software EC key behind the same ``HsmSigner`` the HSM uses (the HSM path itself is
covered by tests/integration/test_ota_tuf_live.py). The fetcher serves the
repository's files and lets a test play the attacker: replace a file, serve endless
data, or serve a stale copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("tuf")

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from securesystemslib.signer import Signer
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from cloud_sidecar.tuf_repo import ONLINE_ROLES, AdapterCustom, Expiry, TufRepository
from cloud_sidecar.tuf_signer import FileRootKeys, HsmSigner
from edge_daemon.ota_clock import TrustedClock
from edge_daemon.ota_tuf import METADATA_URL, TARGETS_URL, TufUpdateClient

BASE = "b" * 64
FORMAT = "lora-edge-v1"
DEVICE = "dev-01"
LIFETIME = Expiry().timestamp
STATE_KEY = bytes(range(32))  # the OTA state MAC key (the daemon derives it from the TPM)


def software_online_signer() -> HsmSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return HsmSigner(pem, lambda d: key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))))


def software_online_signers() -> dict[str, HsmSigner]:
    """One software key per online role (the sidecar's are in the HSM)."""
    return {role: software_online_signer() for role in ONLINE_ROLES}


class RepoFetcher(FetcherInterface):
    """Serves ``repo_dir``; ``override[path]`` replaces a file's bytes (or a generator)."""

    def __init__(self, repo_dir: Path) -> None:
        self.dir = repo_dir
        self.override: dict[str, bytes | Callable[[], Iterator[bytes]]] = {}
        self.requests: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        for prefix, sub in ((METADATA_URL, "metadata/"), (TARGETS_URL, "targets/")):
            if url.startswith(prefix):
                rel = sub + url[len(prefix) :]
                break
        else:
            raise DownloadHTTPError(f"unknown url {url}", 404)
        self.requests.append(rel)
        if rel in self.override:
            o = self.override[rel]
            return iter([o]) if isinstance(o, bytes) else o()
        path = self.dir / rel
        if not path.is_file():
            raise DownloadHTTPError(f"{rel} not found", 404)
        return iter([path.read_bytes()])


def endless() -> Iterator[bytes]:
    return itertools.repeat(b"{" * 1024)


@dataclass
class World:
    tmp: Path
    roots: list[Signer]
    online: dict[str, HsmSigner]
    repo: TufRepository
    fetcher: RepoFetcher
    system_now: list[datetime] = field(default_factory=lambda: [datetime.now(UTC)])
    monotonic: list[float] = field(default_factory=lambda: [1000.0])
    clocks: dict[str, TrustedClock] = field(default_factory=dict)

    def client(
        self, device: str = DEVICE, base: str = BASE, state: str = "device"
    ) -> TufUpdateClient:
        # one clock per device and boot: the daemon keeps it for its whole run
        clock = self.clocks.setdefault(
            state,
            TrustedClock(
                self.tmp / state / "ota" / "clock.json",
                state_key=STATE_KEY,
                timestamp_lifetime=LIFETIME,
                system_now=lambda: self.system_now[0],
                monotonic=lambda: self.monotonic[0],
            ),
        )
        c = TufUpdateClient(
            self.tmp / state,
            self.fetcher,
            device_id=device,
            base_sha256=base,
            adapter_format=FORMAT,
            clock=clock,
            state_key=STATE_KEY,
        )
        c.bootstrap((self.repo.metadata_dir / "1.root.json").read_bytes())
        return c

    def add(self, data: bytes, version: int, base: str = BASE, percent: int = 100) -> str:
        name = f"adapter-v{version}.safetensors"
        self.repo.add_target(name, data, AdapterCustom(base, FORMAT, version, "all", percent))
        return name


def make_world(tmp: Path, now: Callable[[], datetime] | None = None) -> World:
    roots = FileRootKeys(tmp / "root-keys").ensure()
    online = software_online_signers()
    kwargs = {"now": now} if now is not None else {}
    repo = TufRepository.create(
        tmp / "repo", root_signers=roots, root_threshold=2, online=online, **kwargs
    )
    return World(tmp, roots, online, repo, RepoFetcher(tmp / "repo"))


def hours(n: float) -> timedelta:
    return timedelta(hours=n)
