"""Topic names, the device id rule, and the control messages' strict parsing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError, TooLargeError
from fleet_protocol.messages import Ack, OtaStatus


def test_upload_topic_round_trips_to_its_device() -> None:
    assert topics.device_of_upload(topics.upload("pi-07")) == "pi-07"


@pytest.mark.parametrize(
    "topic", ["fleet/v1/pi-07/ack", "fleet/v2/pi-07/upload", "fleet/v1/+/upload", "x"]
)
def test_non_upload_topics_are_refused(topic: str) -> None:
    with pytest.raises(MalformedError):
        topics.device_of_upload(topic)


@pytest.mark.parametrize("device", ["", "Pi-07", "pi/07", "-pi", "a" * 64, "pi 07", "#"])
def test_invalid_device_ids_are_refused(device: str) -> None:
    with pytest.raises(MalformedError):
        topics.upload(device)


def _ack(**kw: object) -> Ack:
    fields: dict[str, object] = {
        "batch_id": "a" * 32, "seq": 3, "status": "stored", "reason": "",
        "digest": "d" * 64, "kid": "0" * 16,
    }  # fmt: skip
    return Ack.model_validate(fields | kw)


def test_ack_round_trips() -> None:
    ack = _ack()
    assert Ack.from_bytes(ack.to_bytes()) == ack


def _ack_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    k = ec.generate_private_key(ec.SECP256R1())
    pem = k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return k, pem


def _signer(k: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda d: k.sign(d, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_signed_ack_verifies_and_survives_the_wire() -> None:
    k, pem = _ack_key()
    ack = _ack().signed(_signer(k))
    Ack.from_bytes(ack.to_bytes()).verify(pem)


@pytest.mark.parametrize(
    "change",
    [{"status": "rejected"}, {"digest": "e" * 64}, {"batch_id": "b" * 32}, {"seq": 4}],
)
def test_changing_any_field_of_a_signed_ack_breaks_its_signature(change: dict[str, object]) -> None:
    k, pem = _ack_key()
    forged = _ack().signed(_signer(k)).model_copy(update=change)
    with pytest.raises(SignatureError):
        forged.verify(pem)


def test_unsigned_or_otherwise_signed_acks_do_not_verify() -> None:
    _, pem = _ack_key()
    with pytest.raises(SignatureError, match="not signed"):
        _ack().verify(pem)
    other, _ = _ack_key()
    with pytest.raises(SignatureError):
        _ack().signed(_signer(other)).verify(pem)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"batch_id":"x"}',
        b'{"batch_id":"x","seq":1,"status":"eaten","reason":""}',
        b"\xff",
    ],
)
def test_malformed_acks_raise_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        Ack.from_bytes(payload)


def test_oversized_control_message_is_refused() -> None:
    with pytest.raises(TooLargeError):
        OtaStatus.from_bytes(b" " * 20_000)
