"""One accepted encoding per signed message (issue 9): ECDSA signatures are low-S.

A broker relaying an envelope or an enrollment request could replace ``s`` by ``n - s``:
the signature still verifies, but the bytes (and any digest over them) differ, so a
resend could pass for something new or a message for a replay. Software keys.
"""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from fleet_protocol import enroll, envelope, low_s
from fleet_protocol.errors import MalformedError

DEVICE = ec.generate_private_key(ec.SECP256R1())
WRAP = rsa.generate_private_key(public_exponent=65537, key_size=3072)
WRAP_PEM = WRAP.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _flip(der: bytes) -> bytes:
    r, s = utils.decode_dss_signature(der)
    return utils.encode_dss_signature(r, low_s.P256_ORDER - s)


def _high_s_signer(digest: bytes) -> bytes:
    """A signer (a TPM) that returns whichever of the two valid forms is high-S."""
    der = DEVICE.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    _r, s = utils.decode_dss_signature(der)
    return der if s > low_s.HALF_ORDER else _flip(der)


def _seal() -> bytes:
    return envelope.seal(
        b"features",
        device="pi-00",
        batch_id="ab" * 16,
        seq=1,
        created_at_ms=int(time.time() * 1000),
        wrap_public_key_pem=WRAP_PEM,
        kid_wrap=envelope.key_id_from_pem(WRAP_PEM),
        kid_sig="0" * 16,
        sign_digest=_high_s_signer,
    )


def test_seal_normalises_a_high_s_signature_and_parse_accepts_it() -> None:
    env = envelope.parse(_seal())
    _r, s = utils.decode_dss_signature(env.signature)
    assert s <= low_s.HALF_ORDER


def test_an_envelope_re_encoded_with_high_s_is_refused() -> None:
    data = _seal()
    env = envelope.parse(data)
    flipped = _flip(env.signature)
    DEVICE.public_key().verify(  # still a valid signature: only the encoding differs
        flipped, env.signed_digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    )
    h = env.header_bytes
    forged = (
        b"SEV1"
        + struct.pack(">I", len(h))
        + h
        + struct.pack(">H", len(flipped))
        + flipped
        + env.ciphertext
    )
    assert envelope.parse(data) and forged != data
    with pytest.raises(MalformedError, match="not low"):
        envelope.parse(forged)


def test_an_enrollment_request_re_encoded_with_high_s_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    req = enroll.RenewRequest(
        device_id="pi-00",
        kid="0" * 16,
        csr=enroll.make_csr(key, "pi-00"),
        created_at_ms=int(time.time() * 1000),
        nonce=enroll.new_nonce(),
    ).signed(_high_s_signer)
    assert enroll.RenewRequest.from_bytes(req.to_bytes()) == req  # normalised when signed
    doc = json.loads(req.to_bytes())
    doc["sig"] = base64.b64encode(_flip(base64.b64decode(doc["sig"]))).decode()
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MalformedError, match="not low"):
        enroll.RenewRequest.from_bytes(data)


def test_normalize_is_idempotent_and_keeps_the_signature_valid() -> None:
    digest = b"\x01" * 32
    der = _high_s_signer(digest)
    low = low_s.normalize(der)
    assert low_s.normalize(low) == low
    low_s.check(low)
    DEVICE.public_key().verify(low, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
