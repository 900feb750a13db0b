"""Store schema upgrade and claim rules; the device's TLS identity at rest; renewal timing.

Pure logic with software keys and a temp SQLite file; the TPM, broker and HSM paths are
in tests/integration/test_enrollment.py and test_revocation.py.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_sidecar import store_schema
from cloud_sidecar.store import SCHEMA_VERSION, Store
from edge_daemon.enroll import IdentityStore, TlsIdentity, tls_key_password
from tests.unit.store_keys import memory_data_keys

PUB = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_a_version_1_store_is_upgraded_in_place_and_keeps_its_devices(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN; {store_schema.SCHEMA} PRAGMA user_version=1; COMMIT;")
    db.execute(
        "INSERT INTO devices(device_id, public_key_pem, key_id, registered_at_ms, last_seq)"
        " VALUES ('pi-00', ?, 'abcd', 1, 41)",
        (PUB,),
    )
    db.commit()
    db.close()

    s = Store(path, "eu-central-1", data_keys=memory_data_keys())
    (version,) = s._db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION >= 2
    dev = s.device("pi-00")
    assert dev is not None and dev.last_seq == 41
    s.add_claim("00" * 8, "pi-00", "h", _now_ms() + 60_000)
    s.close()
    assert (
        Store(path, "eu-central-1", data_keys=memory_data_keys()).device("pi-00") is not None
    )  # reopening is a no-op


def test_a_claim_is_used_once_only_by_its_device_with_its_token_before_expiry(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path / "s.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    now = _now_ms()
    s.add_claim("aa" * 8, "pi-01", "good", now + 60_000)
    s.add_claim("bb" * 8, "pi-02", "good", now - 1)
    assert s.use_claim("cc" * 8, "pi-01", "good", now) == "unknown_claim"
    assert s.use_claim("aa" * 8, "pi-01", "bad", now) == "bad_token"
    assert s.use_claim("aa" * 8, "pi-09", "good", now) == "claim_device_mismatch"
    assert s.use_claim("bb" * 8, "pi-02", "good", now) == "claim_expired"
    assert s.use_claim("aa" * 8, "pi-01", "good", now) == ""
    assert s.use_claim("aa" * 8, "pi-01", "good", now) == "claim_used"


def test_revoking_a_device_returns_every_serial_and_marks_it_revoked(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    assert s.revoke_device("nobody", _now_ms()) is None
    s.register_device("pi-03", PUB)
    s.add_certificate("1a", "pi-03", 0, 1, "enroll")
    s.add_certificate("2b", "pi-03", 0, 2, "renew")
    assert s.revoke_device("pi-03", _now_ms()) == ["1a", "2b"]
    dev = s.device("pi-03")
    assert dev is not None and dev.status == "revoked"
    assert all(revoked is not None for _, _, revoked in s.certificates("pi-03"))
    assert s.revoke_device("pi-03", _now_ms()) == ["1a", "2b"]  # again: same list


def _self_signed(key: ec.EllipticCurvePrivateKey, days: float) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi-04")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def test_the_tls_key_is_stored_encrypted_under_the_storage_key(tmp_path: Path) -> None:
    storage_key = os.urandom(32)
    store = IdentityStore(tmp_path / "tls", storage_key)
    assert store.current() is None
    key = ec.generate_private_key(ec.SECP256R1())
    identity = store.install(key, _self_signed(key, 7))
    pem = identity.path.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert identity.path.stat().st_mode & 0o077 == 0
    with pytest.raises((TypeError, ValueError)):
        serialization.load_pem_private_key(pem, None)
    with pytest.raises((TypeError, ValueError)):
        serialization.load_pem_private_key(pem, tls_key_password(os.urandom(32)))
    assert serialization.load_pem_private_key(pem, tls_key_password(storage_key)) is not None
    assert store.current() == identity
    # another device's storage key (another TPM) cannot use the file
    assert IdentityStore(tmp_path / "tls", os.urandom(32)).current() is None


def test_renewal_is_due_after_the_configured_fraction_of_the_lifetime() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ident = TlsIdentity(Path("x"), b"p", start, start + dt.timedelta(days=3))
    assert not ident.renew_due(2 / 3, start + dt.timedelta(days=1))
    assert ident.renew_due(2 / 3, start + dt.timedelta(days=2, seconds=1))
    assert not ident.expired(start + dt.timedelta(days=2))
    assert ident.expired(start + dt.timedelta(days=3))
