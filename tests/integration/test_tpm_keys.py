"""TpmKeyStore against a real swtpm started by devstack: signing, sealing, persistence."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from devstack.procs import ProcessGroup, free_port, require_tool
from devstack.swtpm import Swtpm, start_swtpm
from edge_daemon.errors import KeyStoreError
from edge_daemon.keys import TpmKeyStore
from edge_daemon.keys.tpm import STORAGE_BLOB

pytestmark = pytest.mark.integration

_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    require_tool("swtpm")
    with ProcessGroup(tmp_path / "logs") as group:
        yield group


@pytest.fixture
def tpm(procs: ProcessGroup, tmp_path: Path) -> Swtpm:
    return start_swtpm(procs, tmp_path / "tpm-state")


def _verify(pem: bytes, signature: bytes, digest: bytes) -> None:
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    key.verify(signature, digest, _ECDSA)


def test_tpm_signature_verifies_with_exported_public_key(tpm: Swtpm, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"batch").digest()
    with TpmKeyStore(tpm.tcti, tmp_path / "keys") as store:
        pem = store.signing_public_key_pem()
        signature = store.sign_digest(digest)
        kid = store.signing_key_id()
    _verify(pem, signature, digest)
    with pytest.raises(InvalidSignature):
        _verify(pem, signature, hashlib.sha256(b"other").digest())
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert kid == hashlib.sha256(der).hexdigest()[:16]


def test_keys_and_storage_key_survive_swtpm_restart_and_a_new_store(
    procs: ProcessGroup, tpm: Swtpm, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    with TpmKeyStore(tpm.tcti, keys) as store:
        pem = store.signing_public_key_pem()
        storage = store.storage_key()
        assert store.storage_key() == storage
    procs.stop(tpm.child)
    restarted = start_swtpm(procs, tpm.state_dir)
    digest = hashlib.sha256(b"after restart").digest()
    with TpmKeyStore(restarted.tcti, keys) as store:
        assert store.signing_public_key_pem() == pem
        assert store.storage_key() == storage
        _verify(pem, store.sign_digest(digest), digest)
    assert len(storage) == 32


def test_storage_key_blob_on_disk_is_not_the_key(tpm: Swtpm, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with TpmKeyStore(tpm.tcti, keys) as store:
        storage = store.storage_key()
    assert sorted(p.name for p in keys.iterdir()) == [STORAGE_BLOB]  # no temp files left
    blob = (keys / STORAGE_BLOB).read_bytes()
    assert storage not in blob
    assert storage.hex().encode() not in blob
    assert storage[:8] not in blob


def test_blobs_do_not_load_in_another_tpm(procs: ProcessGroup, tpm: Swtpm, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with TpmKeyStore(tpm.tcti, keys) as store:
        store.signing_public_key_pem()
        store.storage_key()
    other = start_swtpm(procs, tmp_path / "other-tpm-state")
    with TpmKeyStore(other.tcti, keys) as store:
        with pytest.raises(KeyStoreError):
            store.storage_key()
        with pytest.raises(KeyStoreError):
            store.signing_public_key_pem()


def test_corrupt_or_oversized_storage_blob_raises_key_store_error(
    tpm: Swtpm, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    with TpmKeyStore(tpm.tcti, keys) as store:
        store.storage_key()
    blob = keys / STORAGE_BLOB
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with TpmKeyStore(tpm.tcti, keys) as store, pytest.raises(KeyStoreError):
        store.storage_key()
    blob.write_bytes(b"\x00" * 10_000)
    with TpmKeyStore(tpm.tcti, keys) as store, pytest.raises(KeyStoreError):
        store.storage_key()


def test_identity_key_lives_at_a_persistent_handle_and_survives_a_wiped_state_dir(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    from edge_daemon.keys.tpm import SIGNING_PERSISTENT_HANDLE

    tpm = start_swtpm(procs, tmp_path / "tpm-state")
    with TpmKeyStore(tpm.tcti, tmp_path / "sd-card-1") as store:
        pem = store.signing_public_key_pem()
    out = subprocess.run(
        ["tpm2_getcap", "-T", f"swtpm:host=127.0.0.1,port={tpm.port}", "handles-persistent"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"{SIGNING_PERSISTENT_HANDLE:#x}" in out.stdout.lower()
    with TpmKeyStore(tpm.tcti, tmp_path / "sd-card-2") as store:  # a new, empty SD card
        assert store.signing_public_key_pem() == pem
        digest = hashlib.sha256(b"same identity").digest()
        _verify(pem, store.sign_digest(digest), digest)


def test_bad_digest_length_and_closed_store_raise_key_store_error(
    tpm: Swtpm, tmp_path: Path
) -> None:
    store = TpmKeyStore(tpm.tcti, tmp_path / "keys")
    with pytest.raises(KeyStoreError):
        store.sign_digest(b"\x00" * 31)
    store.close()
    store.close()
    with pytest.raises(KeyStoreError):
        store.storage_key()


def test_unreachable_tpm_raises_key_store_error(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError):
        TpmKeyStore(f"swtpm:host=127.0.0.1,port={free_port()}", tmp_path / "keys")


def test_store_opens_after_earlier_processes_died_without_closing(
    tpm: Swtpm, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    crash = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from edge_daemon.keys import TpmKeyStore
        s = TpmKeyStore({tpm.tcti!r}, Path({str(keys)!r}))
        s.signing_public_key_pem(); s.storage_key()
        os._exit(0)  # no close: the primary and signing key stay loaded in the TPM
        """
    )
    for _ in range(3):  # more leftovers than swtpm has transient object slots
        subprocess.run([sys.executable, "-c", crash], check=True, timeout=60)
    with TpmKeyStore(tpm.tcti, keys) as store:
        digest = hashlib.sha256(b"x").digest()
        _verify(store.signing_public_key_pem(), store.sign_digest(digest), digest)
        assert len(store.storage_key()) == 32


def test_storage_key_never_crosses_the_tpm_bus_in_clear(
    tpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = tmp_path / "bus.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(capture))  # pcap TCTI records every command
    with TpmKeyStore(f"pcap:{tpm.tcti}", tmp_path / "keys") as store:
        sealed = store.storage_key()  # get_random + create
        assert store.storage_key() == sealed  # unseal
    bus = capture.read_bytes()
    assert len(bus) > 1000
    assert sealed[:8] not in bus and sealed[-8:] not in bus
