"""Upload envelope: round trip, each tamper rejected with its class, and parse fuzzing.

Software keys (``cryptography``) stand in for the TPM and the HSM here; the same
paths with the real ones are in tests/integration/test_envelope_real_keys.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_protocol import envelope as env
from fleet_protocol.errors import (
    DecryptError,
    MalformedError,
    ProtocolError,
    SignatureError,
    TooLargeError,
    UnsupportedAlgorithmError,
)

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


WRAP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=3072)
OTHER_WRAP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=3072)
DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
WRAP_PEM, DEVICE_PEM = _pem(WRAP_KEY), _pem(DEVICE_KEY)
PLAINTEXT = b"batch of log-mel features and labels " * 20


def _sign(digest: bytes) -> bytes:
    return DEVICE_KEY.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def _unwrap(wrapped: bytes) -> bytes:
    return WRAP_KEY.decrypt(wrapped, _OAEP)


def _seal(plaintext: bytes = PLAINTEXT, **overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "device": "pi-0042",
        "batch_id": "0123456789abcdef0123456789abcdef",
        "seq": 7,
        "created_at_ms": 1_700_000_000_000,
        "wrap_public_key_pem": WRAP_PEM,
        "kid_wrap": env.key_id_from_pem(WRAP_PEM),
        "kid_sig": env.key_id_from_pem(DEVICE_PEM),
        "sign_digest": _sign,
    }
    kwargs.update(overrides)
    return env.seal(plaintext, **kwargs)


VALID = _seal()


def _frame(header: bytes, signature: bytes, ciphertext: bytes) -> bytes:
    return b"".join(
        (
            env.MAGIC,
            struct.pack(">I", len(header)),
            header,
            struct.pack(">H", len(signature)),
            signature,
            ciphertext,
        )
    )


def _with_header(edit: Callable[[dict[str, Any]], None], data: bytes = VALID) -> bytes:
    """Re-frame ``data`` with an edited (still canonical) header, same signature/ciphertext."""
    e = env.parse(data)
    doc = json.loads(e.header_bytes)
    edit(doc)
    header = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return _frame(header, e.signature, e.ciphertext)


# -- round trip --------------------------------------------------------------------------


def test_round_trip_returns_plaintext_and_header_fields() -> None:
    e = env.parse(VALID)
    env.verify_signature(e, DEVICE_PEM)
    assert env.open_envelope(e, _unwrap) == PLAINTEXT
    h = e.header
    assert (h.device, h.seq, h.created_at_ms) == ("pi-0042", 7, 1_700_000_000_000)
    assert (h.aead, h.wrap, h.sig, h.v) == ("A256GCM", "RSA-OAEP-SHA1", "ECDSA-P256-SHA256", 2)
    assert len(h.wrapped_key) == 384 and len(h.nonce) == 12


def test_header_is_canonical_json_with_exactly_the_contract_fields() -> None:
    e = env.parse(VALID)
    doc = json.loads(e.header_bytes)
    assert set(doc) == {
        "v", "device", "batch_id", "seq", "created_at_ms", "aead", "wrap", "sig",
        "kid_wrap", "kid_sig", "wrapped_key", "nonce", "epoch",
    }  # fmt: skip
    assert e.header_bytes == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert e.header.canonical_bytes() == e.header_bytes


def test_signed_digest_covers_magic_header_length_header_and_ciphertext() -> None:
    e = env.parse(VALID)
    h = hashes.Hash(hashes.SHA256())
    h.update(b"SEV1" + struct.pack(">I", len(e.header_bytes)) + e.header_bytes + e.ciphertext)
    assert e.signed_digest() == h.finalize()


def test_two_seals_of_the_same_batch_use_fresh_keys_and_nonces() -> None:
    a, b = env.parse(_seal()), env.parse(_seal())
    assert a.header.nonce != b.header.nonce and a.header.wrapped_key != b.header.wrapped_key
    assert a.ciphertext != b.ciphertext


def test_empty_plaintext_round_trips() -> None:
    e = env.parse(_seal(b""))
    env.verify_signature(e, DEVICE_PEM)
    assert env.open_envelope(e, _unwrap) == b""


# -- tampering ---------------------------------------------------------------------------


def test_changed_header_field_fails_signature_and_aead() -> None:
    tampered = env.parse(_with_header(lambda d: d.update(seq=8)))
    with pytest.raises(SignatureError):
        env.verify_signature(tampered, DEVICE_PEM)
    with pytest.raises(DecryptError):
        env.open_envelope(tampered, _unwrap)


def test_flipped_header_byte_is_rejected_by_parse() -> None:
    data = bytearray(VALID)
    data[8 + 2] ^= 0x01  # inside the JSON header
    with pytest.raises(MalformedError):
        env.parse(bytes(data))


def test_flipped_ciphertext_byte_fails_signature_and_aead() -> None:
    data = bytearray(VALID)
    data[-5] ^= 0x80
    tampered = env.parse(bytes(data))
    with pytest.raises(SignatureError):
        env.verify_signature(tampered, DEVICE_PEM)
    with pytest.raises(DecryptError):
        env.open_envelope(tampered, _unwrap)


def test_flipped_signature_byte_fails_verification() -> None:
    e = env.parse(VALID)
    sig = bytearray(e.signature)
    sig[-1] ^= 0x01
    with pytest.raises(SignatureError):
        env.verify_signature(
            env.parse(_frame(e.header_bytes, bytes(sig), e.ciphertext)), DEVICE_PEM
        )


def test_signature_by_another_device_key_is_rejected() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    forged = _seal(sign_digest=lambda d: other.sign(d, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
    with pytest.raises(SignatureError):
        env.verify_signature(env.parse(forged), DEVICE_PEM)
    with pytest.raises(SignatureError):  # kid_sig names DEVICE_PEM, not this key
        env.verify_signature(env.parse(VALID), _pem(OTHER_DEVICE_KEY))


def test_non_der_signature_is_malformed() -> None:
    e = env.parse(VALID)
    with pytest.raises(MalformedError):
        env.parse(_frame(e.header_bytes, b"\x00" * 64, e.ciphertext))


def test_every_truncation_in_the_frame_is_malformed() -> None:
    e = env.parse(VALID)
    frame_end = len(VALID) - len(e.ciphertext) + 16  # need at least a GCM tag
    for cut in range(frame_end):
        with pytest.raises(MalformedError):
            env.parse(VALID[:cut])


def test_truncated_ciphertext_parses_but_fails_signature_and_aead() -> None:
    tampered = env.parse(VALID[:-1])
    with pytest.raises(SignatureError):
        env.verify_signature(tampered, DEVICE_PEM)
    with pytest.raises(DecryptError):
        env.open_envelope(tampered, _unwrap)


# -- caps --------------------------------------------------------------------------------


def test_oversize_envelope_is_too_large() -> None:
    with pytest.raises(TooLargeError):
        env.parse(VALID, env.EnvelopeLimits(max_total=len(VALID) - 1))
    with pytest.raises(TooLargeError):
        env.parse(VALID + b"\x00" * (8 * 1024 * 1024))


def test_oversize_header_and_signature_lengths_are_too_large() -> None:
    with pytest.raises(TooLargeError):
        env.parse(env.MAGIC + struct.pack(">I", 4097) + b"{" * 5000)
    e = env.parse(VALID)
    with pytest.raises(TooLargeError):
        env.parse(_frame(e.header_bytes, b"\x30" * 81, e.ciphertext))


def test_seal_refuses_to_build_an_envelope_over_the_cap() -> None:
    with pytest.raises(TooLargeError):
        _seal(b"x" * 5000, limits=env.EnvelopeLimits(max_total=4000))


# -- header fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("aead", "A128GCM"), ("wrap", "RSA-OAEP-SHA256"), ("sig", "EdDSA"), ("v", 3)],
)
def test_unknown_algorithm_or_version_is_unsupported(field: str, value: object) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        env.parse(_with_header(lambda d: d.update({field: value})))


def test_other_magic_version_is_unsupported_and_garbage_is_malformed() -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        env.parse(b"SEV2" + VALID[4:])
    with pytest.raises(MalformedError):
        env.parse(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", "Pi-0042"),
        ("device", "-pi"),
        ("device", "pi_0042"),
        ("device", "p" * 64),
        ("device", "pi\n"),
        ("batch_id", "0123456789ABCDEF0123456789ABCDEF"),
        ("batch_id", "0123"),
        ("seq", -1),
        ("seq", 2**63),
        ("seq", True),
        ("seq", 7.0),
        ("seq", "7"),
        ("created_at_ms", None),
        ("kid_wrap", "xyz"),
        ("kid_sig", 5),
        ("wrapped_key", "not base64!"),
        ("wrapped_key", base64.b64encode(b"short").decode()),
        ("nonce", base64.b64encode(b"\x00" * 11).decode()),
        ("nonce", base64.b64encode(b"\x00" * 12).decode().rstrip("=") + "A"),
        ("v", "1"),
        ("aead", 1),
        ("epoch", -1),
        ("epoch", "1"),
    ],
)
def test_bad_field_value_is_malformed(field: str, value: object) -> None:
    with pytest.raises(MalformedError):
        env.parse(_with_header(lambda d: d.update({field: value})))


def test_extra_or_missing_field_is_malformed() -> None:
    with pytest.raises(MalformedError):
        env.parse(_with_header(lambda d: d.update(extra=1)))
    with pytest.raises(MalformedError):
        env.parse(_with_header(lambda d: d.pop("kid_sig")))


@pytest.mark.parametrize(
    "header",
    [
        b'{"v": 1}',  # not canonical (space)
        b'{"v":1,"v":1}',  # duplicate key
        b"[1,2]",
        b"\xff\xfe",
        b'{"v":NaN}',
        b"[" * 3000 + b"]" * 1000,  # nesting deeper than the recursion limit
    ],
)
def test_non_canonical_or_non_object_header_is_malformed(header: bytes) -> None:
    e = env.parse(VALID)
    with pytest.raises(MalformedError):
        env.parse(_frame(header, e.signature, e.ciphertext))


def test_seal_rejects_bad_device_id_and_mismatched_wrap_key_id() -> None:
    with pytest.raises(MalformedError):
        _seal(device="Bad Device")
    with pytest.raises(MalformedError):
        _seal(kid_wrap="0" * 16)


# -- opening -----------------------------------------------------------------------------


def test_opening_with_a_different_rsa_key_is_a_decrypt_error() -> None:
    with pytest.raises(DecryptError):
        env.open_envelope(env.parse(VALID), lambda w: OTHER_WRAP_KEY.decrypt(w, _OAEP))


def test_unwrap_returning_a_wrong_length_key_is_a_decrypt_error() -> None:
    with pytest.raises(DecryptError):
        env.open_envelope(env.parse(VALID), lambda w: b"\x00" * 16)


def test_unwrap_infrastructure_failure_propagates_unchanged() -> None:
    class TokenDownError(Exception):
        pass

    def down(_: bytes) -> bytes:
        raise TokenDownError("HSM unreachable")

    with pytest.raises(TokenDownError):
        env.open_envelope(env.parse(VALID), down)


# -- fuzzing -----------------------------------------------------------------------------

_FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _parse_only_raises_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        env.parse(data)


_random_inputs = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=600).map(lambda b: env.MAGIC + b),
    st.tuples(st.integers(0, 700), st.binary(max_size=700)).map(
        lambda t: env.MAGIC + struct.pack(">I", t[0]) + t[1]
    ),
)


@_FUZZ
@given(_random_inputs)
def test_parse_of_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    _parse_only_raises_protocol_errors(data)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.integers(0, 64)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, at, arg in ops:
        pos = min(at, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif op == "cut":
            del buf[pos : pos + arg]
        elif op == "insert":
            buf[pos:pos] = arg
    return bytes(buf)


@_FUZZ
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_parse_of_mutated_valid_envelope_raises_only_protocol_errors(
    ops: list[tuple[str, int, Any]],
) -> None:
    _parse_only_raises_protocol_errors(_mutate(VALID, ops))


_VALID_PARTS = env.parse(VALID)
_VALID_DOC: dict[str, Any] = json.loads(_VALID_PARTS.header_bytes)
_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json_value = (
    _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(st.text(max_size=4), _scalar)
)


@settings(_FUZZ, max_examples=600)
@given(st.dictionaries(st.sampled_from([*sorted(_VALID_DOC), "x"]), _json_value, max_size=3))
def test_parse_of_random_header_objects_raises_only_protocol_errors(edits: dict[str, Any]) -> None:
    header = json.dumps({**_VALID_DOC, **edits}, sort_keys=True, separators=(",", ":")).encode()
    _parse_only_raises_protocol_errors(
        _frame(header, _VALID_PARTS.signature, _VALID_PARTS.ciphertext)
    )


# -- sequence epoch (header v2, docs/adr/0017) --------------------------------------------


def test_epoch_travels_in_the_signed_header_and_round_trips() -> None:
    e = env.parse(_seal(epoch=123456789))
    env.verify_signature(e, DEVICE_PEM)
    assert (e.header.v, e.header.epoch) == (2, 123456789)
    assert e.header.canonical_bytes() == e.header_bytes


def test_version_1_header_without_epoch_still_parses_with_epoch_0() -> None:
    v1 = _with_header(lambda d: (d.pop("epoch"), d.update(v=1)))
    assert env.parse(v1).header.epoch == 0 and env.parse(v1).header.v == 1
    with pytest.raises(MalformedError):  # v2 must carry its epoch, v1 must not
        env.parse(_with_header(lambda d: d.pop("epoch")))
    with pytest.raises(MalformedError):
        env.parse(_with_header(lambda d: d.update(v=1)))
