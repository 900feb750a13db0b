"""Hsm against a real SoftHSM2 token initialised by devstack: unwrap, sign, key attributes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, ObjectClass

from cloud_sidecar.errors import HsmDecryptError, HsmError, HsmPinError, HsmUnavailableError
from cloud_sidecar.keys import SIGNING_LABEL, UNWRAP_LABEL, Hsm
from devstack.softhsm import HsmToken, init_token

pytestmark = pytest.mark.integration

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmToken]:
    tok = init_token(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tok.env().items():  # before the PKCS#11 library is (re)initialised
            mp.setenv(k, v)
        with Hsm(str(tok.module), tok.label, tok.user_pin) as hsm:
            hsm.ensure_keys()
        yield tok


@pytest.fixture
def hsm(token: HsmToken) -> Iterator[Hsm]:
    with Hsm(str(token.module), token.label, token.user_pin) as h:
        yield h


def test_decrypt_oaep_recovers_a_key_wrapped_with_the_exported_public_key(hsm: Hsm) -> None:
    public = serialization.load_pem_public_key(hsm.unwrap_public_key_pem())
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072
    aes_key = os.urandom(32)
    assert hsm.decrypt_oaep(public.encrypt(aes_key, _OAEP)) == aes_key


def test_sign_digest_verifies_with_the_exported_public_key(hsm: Hsm) -> None:
    public = serialization.load_pem_public_key(hsm.signing_public_key_pem())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    digest = hashlib.sha256(b"targets.json").digest()
    public.verify(hsm.sign_digest(digest), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_key_ids_are_sha256_of_spki_and_stable_across_ensure_keys(hsm: Hsm) -> None:
    before = (hsm.unwrap_key_id(), hsm.signing_key_id())
    hsm.ensure_keys()
    assert (hsm.unwrap_key_id(), hsm.signing_key_id()) == before
    der = serialization.load_pem_public_key(hsm.unwrap_public_key_pem()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert before[0] == hashlib.sha256(der).hexdigest()[:16]


def test_private_keys_are_sensitive_non_extractable_and_single_use(
    hsm: Hsm, token: HsmToken
) -> None:
    # Login state is per application: a second session of this process sees the keys.
    with pkcs11.lib(str(token.module)).get_token(token_label=token.label).open() as session:
        unwrap = session.get_key(ObjectClass.PRIVATE_KEY, label=UNWRAP_LABEL)
        signing = session.get_key(ObjectClass.PRIVATE_KEY, label=SIGNING_LABEL)
        for key in (unwrap, signing):
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.TOKEN] is True
        assert (unwrap[Attribute.DECRYPT], unwrap[Attribute.SIGN]) == (True, False)
        assert (signing[Attribute.SIGN], signing[Attribute.DECRYPT]) == (True, False)
        assert signing[Attribute.DERIVE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            unwrap[Attribute.PRIVATE_EXPONENT]


def test_decrypting_data_for_another_key_is_hsm_decrypt_error_and_session_stays_usable(
    hsm: Hsm,
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    with pytest.raises(HsmDecryptError):
        hsm.decrypt_oaep(other.encrypt(b"k" * 32, _OAEP))
    with pytest.raises(HsmDecryptError):
        hsm.decrypt_oaep(b"short")
    public = serialization.load_pem_public_key(hsm.unwrap_public_key_pem())
    assert isinstance(public, rsa.RSAPublicKey)
    assert hsm.decrypt_oaep(public.encrypt(b"k" * 32, _OAEP)) == b"k" * 32


def test_wrong_pin_gives_hsm_pin_error_never_unavailable(token: HsmToken) -> None:
    """A refused PIN is not "try again later" (issue 9): retrying would lock the token."""
    with pytest.raises(HsmPinError) as e:  # C_Login fails
        Hsm(str(token.module), token.label, "not-the-pin")
    assert not isinstance(e.value, HsmUnavailableError)
    with Hsm(str(token.module), token.label, token.user_pin), pytest.raises(HsmPinError):
        Hsm(str(token.module), token.label, "not-the-pin")  # token already logged in


def test_unknown_module_or_token_gives_hsm_unavailable_error(token: HsmToken) -> None:
    with pytest.raises(HsmUnavailableError):
        Hsm("/nonexistent/libpkcs11.so", token.label, token.user_pin)
    with pytest.raises(HsmUnavailableError):
        Hsm(str(token.module), "no-such-token", token.user_pin)


def test_two_hsm_objects_share_the_login_and_survive_each_others_close(token: HsmToken) -> None:
    first = Hsm(str(token.module), token.label, token.user_pin)
    second = Hsm(str(token.module), token.label, token.user_pin)
    first.close()
    digest = hashlib.sha256(b"x").digest()
    assert len(second.sign_digest(digest)) <= 72
    second.close()
    with pytest.raises(HsmUnavailableError):
        second.sign_digest(digest)


def test_bad_digest_length_is_hsm_error(hsm: Hsm) -> None:
    with pytest.raises(HsmError):
        hsm.sign_digest(b"\x00" * 20)
