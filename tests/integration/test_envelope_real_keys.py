"""The upload envelope with real key custody: TPM (swtpm) signs, SoftHSM unwraps."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloud_sidecar.keys import Hsm
from devstack.procs import ProcessGroup, require_tool
from devstack.softhsm import init_token
from devstack.swtpm import start_swtpm
from edge_daemon.keys import TpmKeyStore
from fleet_protocol import envelope as env
from fleet_protocol.errors import DecryptError, SignatureError

pytestmark = pytest.mark.integration

PLAINTEXT = os.urandom(64 * 1024)


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmKeyStore]:
    require_tool("swtpm")
    base = tmp_path_factory.mktemp("device")
    with ProcessGroup(base / "logs") as procs:
        swtpm = start_swtpm(procs, base / "tpm-state")
        with TpmKeyStore(swtpm.tcti, base / "keys") as store:
            yield store


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    token = init_token(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in token.env().items():
            mp.setenv(k, v)
        with Hsm(str(token.module), token.label, token.user_pin) as h:
            h.ensure_keys()
            yield h


def _seal(tpm: TpmKeyStore, wrap_pem: bytes) -> bytes:
    return env.seal(
        PLAINTEXT,
        device="pi-0001",
        batch_id=os.urandom(16).hex(),
        seq=1,
        created_at_ms=1_700_000_000_000,
        wrap_public_key_pem=wrap_pem,
        kid_wrap=env.key_id_from_pem(wrap_pem),
        kid_sig=tpm.signing_key_id(),
        sign_digest=tpm.sign_digest,
    )


def test_envelope_sealed_by_tpm_for_hsm_key_verifies_and_opens_in_the_hsm(
    tpm: TpmKeyStore, hsm: Hsm
) -> None:
    envelope = env.parse(_seal(tpm, hsm.unwrap_public_key_pem()))
    assert envelope.header.kid_wrap == hsm.unwrap_key_id()
    assert envelope.header.kid_sig == tpm.signing_key_id()
    env.verify_signature(envelope, tpm.signing_public_key_pem())
    assert env.open_envelope(envelope, hsm.decrypt_oaep) == PLAINTEXT


def test_an_upload_cannot_be_decrypted_without_the_hsm_key(tpm: TpmKeyStore, hsm: Hsm) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    other_pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    envelope = env.parse(_seal(tpm, other_pem))
    env.verify_signature(envelope, tpm.signing_public_key_pem())
    with pytest.raises(DecryptError):
        env.open_envelope(envelope, hsm.decrypt_oaep)


def test_tampered_ciphertext_fails_tpm_signature_and_hsm_open(tpm: TpmKeyStore, hsm: Hsm) -> None:
    data = bytearray(_seal(tpm, hsm.unwrap_public_key_pem()))
    data[-100] ^= 0x01
    envelope = env.parse(bytes(data))
    with pytest.raises(SignatureError):
        env.verify_signature(envelope, tpm.signing_public_key_pem())
    with pytest.raises(DecryptError):
        env.open_envelope(envelope, hsm.decrypt_oaep)
