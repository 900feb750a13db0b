"""Enrollment and renewal messages: round trips, signatures, CSR rules, strict parsing, fuzz."""

from __future__ import annotations

import base64
import contextlib
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_protocol import enroll, topics
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError, TooLargeError

_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
IDENTITY = ec.generate_private_key(ec.SECP256R1())
TLS = ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sign(digest: bytes) -> bytes:
    return IDENTITY.sign(digest, _ECDSA)


def _enroll_request(device: str = "pi-07") -> enroll.EnrollRequest:
    claim = enroll.Claim.new()
    return enroll.EnrollRequest(
        device_id=device,
        claim_id=claim.claim_id,
        token=claim.token,
        csr=enroll.make_csr(TLS, device),
        identity_key=_pem(IDENTITY).decode(),
        created_at_ms=int(time.time() * 1000),
        nonce=enroll.new_nonce(),
    ).signed(_sign)


def _renew_request(device: str = "pi-07") -> enroll.RenewRequest:
    return enroll.RenewRequest(
        device_id=device,
        kid=enroll.key_id(IDENTITY.public_key()),
        csr=enroll.make_csr(TLS, device),
        created_at_ms=int(time.time() * 1000),
        nonce=enroll.new_nonce(),
    ).signed(_sign)


VALID_ENROLL = _enroll_request().to_bytes()
VALID_RENEW = _renew_request().to_bytes()
VALID_RESPONSE = enroll.CertResponse(
    device_id="pi-07",
    nonce=enroll.new_nonce(),
    status="rejected",
    reason="token_used",
    cert="",
    not_after_ms=0,
).to_bytes()


def test_enroll_request_round_trips_and_its_signature_verifies() -> None:
    req = enroll.EnrollRequest.from_bytes(VALID_ENROLL)
    assert req.to_bytes() == VALID_ENROLL
    req.verify(_pem(IDENTITY))
    assert enroll.check_csr(req.csr, "pi-07").public_key() == TLS.public_key()


def test_renew_request_round_trips_and_its_signature_verifies() -> None:
    req = enroll.RenewRequest.from_bytes(VALID_RENEW)
    assert req.to_bytes() == VALID_RENEW
    req.verify(_pem(IDENTITY))


def test_a_signature_by_another_key_is_rejected() -> None:
    req = enroll.EnrollRequest.from_bytes(VALID_ENROLL)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureError):
        req.verify(_pem(other))


def test_an_enroll_signature_does_not_verify_as_a_renewal() -> None:
    req = enroll.EnrollRequest.from_bytes(VALID_ENROLL)
    renew = enroll.RenewRequest(
        device_id=req.device_id,
        kid="0" * 16,
        csr=req.csr,
        created_at_ms=req.created_at_ms,
        nonce=req.nonce,
        sig=req.sig,
    )
    with pytest.raises(SignatureError):
        renew.verify(_pem(IDENTITY))


def test_a_changed_field_breaks_the_signature() -> None:
    doc = json.loads(VALID_ENROLL)
    doc["device_id"] = "pi-08"
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    req = enroll.EnrollRequest.from_bytes(tampered)
    with pytest.raises(SignatureError):
        req.verify(_pem(IDENTITY))


def test_a_csr_for_another_device_is_rejected() -> None:
    with pytest.raises(MalformedError) as e:
        enroll.check_csr(enroll.make_csr(TLS, "pi-08"), "pi-07")
    assert e.value.reason == "bad_csr"


def test_a_csr_on_another_curve_is_rejected() -> None:
    k384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(MalformedError):
        enroll.check_csr(enroll.make_csr(k384, "pi-07"), "pi-07")


def test_non_canonical_json_is_rejected() -> None:
    doc = json.loads(VALID_ENROLL)
    with pytest.raises(MalformedError):
        enroll.EnrollRequest.from_bytes(json.dumps(doc, indent=1).encode())


def test_unknown_or_missing_fields_are_rejected() -> None:
    doc = json.loads(VALID_RENEW)
    for bad in ({**doc, "extra": 1}, {k: v for k, v in doc.items() if k != "kid"}):
        with pytest.raises(MalformedError):
            enroll.RenewRequest.from_bytes(
                json.dumps(bad, sort_keys=True, separators=(",", ":")).encode()
            )


def test_oversized_message_is_rejected_before_parsing() -> None:
    with pytest.raises(TooLargeError):
        enroll.EnrollRequest.from_bytes(b" " * (enroll.MAX_MESSAGE_BYTES + 1))


def test_non_der_signature_is_rejected() -> None:
    doc = json.loads(VALID_RENEW)
    doc["sig"] = base64.b64encode(b"\x30\x03abc").decode()
    with pytest.raises(MalformedError):
        enroll.RenewRequest.from_bytes(
            json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        )


def test_claim_string_round_trips_and_bad_ones_are_rejected() -> None:
    claim = enroll.Claim.new()
    assert enroll.Claim.parse(str(claim)) == claim
    for bad in ("", "nodot", f"{claim.claim_id}.short", f"XYZ.{claim.token}"):
        with pytest.raises(MalformedError):
            enroll.Claim.parse(bad)
    assert enroll.token_hash(claim.token) != enroll.token_hash(enroll.Claim.new().token)


def test_topics_parse_back_to_their_ids() -> None:
    claim = enroll.Claim.new()
    assert topics.claim_of_enroll_request(topics.enroll_request(claim.claim_id)) == claim.claim_id
    assert topics.device_of(topics.cert_request("pi-01"), topics.CERT_REQUEST) == "pi-01"
    for bad in ("fleet/v1/enroll/x/request", "fleet/v1/pi-01/cert/response", "a/b"):
        with pytest.raises(MalformedError):
            topics.claim_of_enroll_request(bad)
        with pytest.raises(MalformedError):
            topics.device_of(bad, topics.CERT_REQUEST)


def test_cert_response_round_trips() -> None:
    assert enroll.CertResponse.from_bytes(VALID_RESPONSE).to_bytes() == VALID_RESPONSE


# -- fuzzing: only ProtocolError subclasses, whatever the input --------------------------

_FUZZ = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_PARSERS = (enroll.EnrollRequest, enroll.RenewRequest, enroll.CertResponse)


def _parse_all(data: bytes) -> None:
    for cls in _PARSERS:
        with contextlib.suppress(ProtocolError):
            cls.from_bytes(data)


@_FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _parse_all(data)


@_FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages_raise_only_protocol_errors(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([VALID_ENROLL, VALID_RENEW, VALID_RESPONSE]))
    pos = data.draw(st.integers(0, len(base) - 1))
    chunk = data.draw(st.binary(min_size=0, max_size=8))
    cut = data.draw(st.integers(0, 8))
    _parse_all(base[:pos] + chunk + base[pos + cut :])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@_FUZZ
@given(st.data())
def test_fuzz_field_values_raise_only_protocol_errors(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([VALID_ENROLL, VALID_RENEW, VALID_RESPONSE]))
    doc = json.loads(base)
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(_JSON)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    _parse_all(raw)
    for cls in (enroll.EnrollRequest, enroll.RenewRequest):
        try:
            req = cls.from_bytes(raw)
            req.verify(_pem(IDENTITY))
            enroll.check_csr(req.csr, req.device_id)
        except ProtocolError:
            pass


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedError):
        enroll.CertResponse.from_bytes(b"[" * 10000)
