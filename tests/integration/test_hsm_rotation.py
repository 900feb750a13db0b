"""Unwrap-key rotation, the ack key and transient token errors on a real SoftHSM2 token
(ADR 0002 coexistence; docs/adr/0017). Its own token: rotation changes the current key."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloud_sidecar.errors import HsmDecryptError
from cloud_sidecar.keys import Hsm
from devstack.softhsm import HsmToken, init_token
from fleet_protocol.messages import Ack

pytestmark = pytest.mark.integration

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@pytest.fixture
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    tok: HsmToken = init_token(tmp_path_factory.mktemp("softhsm-rotation"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tok.env().items():
            mp.setenv(k, v)
        with Hsm(str(tok.module), tok.label, tok.user_pin) as h:
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
