"""Unwrap-key rotation, the ack key and transient token errors on a real SoftHSM2 token
(ADR 0002 coexistence; docs/adr/0017). Its own token: rotation changes the current key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloud_sidecar.errors import HsmDecryptError
from cloud_sidecar.keys import Hsm
from devstack.softhsm import HsmToken, init_token
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.messages import Ack

pytestmark = pytest.mark.integration

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@pytest.fixture
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmToken]:
    tok = init_token(tmp_path_factory.mktemp("softhsm-rotation"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tok.env().items():
            mp.setenv(k, v)
        yield tok


@pytest.fixture
def hsm(token: HsmToken) -> Iterator[Hsm]:
    with Hsm(str(token.module), token.label, token.user_pin) as h:
        h.ensure_keys()
        yield h


def _wrap(pem: bytes, key: bytes) -> bytes:
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(key, _OAEP)


def test_after_rotation_old_and_new_unwrap_keys_both_decrypt(hsm: Hsm) -> None:
    old_id, old_pem = hsm.unwrap_key_id(), hsm.unwrap_public_key_pem()
    in_flight = os.urandom(32)
    wrapped_old = _wrap(old_pem, in_flight)
    new_id = hsm.rotate_unwrap_key()
    assert new_id != old_id and hsm.unwrap_key_id() == new_id
    assert hsm.unwrap_key_ids() == (new_id, old_id)
    fresh = os.urandom(32)
    assert hsm.decrypt_oaep(_wrap(hsm.unwrap_public_key_pem(), fresh), new_id) == fresh
    assert hsm.decrypt_oaep(wrapped_old, old_id) == in_flight
    hsm.ensure_keys()  # idempotent after a rotation: no third key
    assert hsm.unwrap_key_ids() == (new_id, old_id)


def test_general_error_from_a_token_that_answers_is_a_transient_decrypt_error(hsm: Hsm) -> None:
    other = rsa.generate_private_key(65537, 3072)
    pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(HsmDecryptError) as e:  # SoftHSM 2.6: CKR_GENERAL_ERROR
        hsm.decrypt_oaep(_wrap(pem, os.urandom(32)))
    assert e.value.transient


def test_acks_signed_by_the_token_verify_with_its_exported_ack_key(hsm: Hsm) -> None:
    ack = Ack(
        batch_id="0f" * 16, seq=1, status="stored", reason="", digest="ab" * 32,
        kid=hsm.ack_key_id(),
    )  # fmt: skip
    signed = ack.signed(lambda d: hsm.sign_digest_with("ack-signing", d))
    Ack.from_bytes(signed.to_bytes()).verify(hsm.ack_public_key_pem())


def test_a_rotation_by_another_session_is_seen_by_a_serving_one(hsm: Hsm, token: HsmToken) -> None:
    serving = Hsm(str(token.module), token.label, token.user_pin)  # the serving sidecar's
    try:
        before = serving.unwrap_key_id()  # cached by the serving sidecar
        new_id = hsm.rotate_unwrap_key()  # e.g. the operator's CLI
        assert serving.unwrap_key_ids() == (new_id, before)
        aes = os.urandom(32)
        assert serving.decrypt_oaep(_wrap(serving.unwrap_public_key_pem(), aes), new_id) == aes
    finally:
        serving.close()


def test_rotate_unwrap_cli_writes_the_new_key_and_audits_it(tmp_path: Path) -> None:
    from devstack.provision import cloud_config, export_cloud_keys
    from devstack.stack import DevStack

    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        old_pem, _ = export_cloud_keys(stack, tmp_path / "keys")
        cfg = cloud_config(stack, tmp_path / "cloud", tmp_path / "no-base-model")
        out = tmp_path / "new-unwrap.pub.pem"
        run = subprocess.run(
            [sys.executable, "-m", "cloud_sidecar", "keys", "rotate-unwrap", "--config",
             str(cfg), "--out", str(out)],
            check=False, capture_output=True, env={**os.environ, **stack.token.env()},
            timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        result = json.loads(run.stdout)
        assert result["old"] == key_id_from_pem(old_pem.read_bytes())
        assert result["new"] == key_id_from_pem(out.read_bytes()) != result["old"]
        last = json.loads((tmp_path / "cloud" / "audit.jsonl").read_text().splitlines()[-1])
        assert last["kind"] == "hsm.unwrap_rotated" and last["details"]["new"] == result["new"]
