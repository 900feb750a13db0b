"""Every JSON wire message (every ``WireModel`` message, found as fleet_protocol.schemas
finds them, so messages added later are covered too) refuses odd input with a
``ProtocolError`` and nothing else, and a device message naming another device than its
topic is refused with ``device_mismatch``.

Odd input: arbitrary Unicode including lone surrogates (escaped ``\\ud800`` and raw
surrogate bytes), huge and non-finite numbers, deep nesting, wrong types, missing and
extra fields, random bytes. ``EXAMPLES_PER_MESSAGE`` examples per message and strategy.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleet_protocol import enroll, schemas, topics
from fleet_protocol.errors import MalformedError, ProtocolError, TooLargeError
from fleet_protocol.labels import CLASSES
from fleet_protocol.messages import Ack, Event, OtaStatus
from fleet_protocol.telemetry import Telemetry
from fleet_protocol.wire import DeviceMessage, WireModel, canonical_json, parse_device_message

EXAMPLES_PER_MESSAGE = 300
MESSAGES = schemas.discover()
DEVICE_MESSAGES = [c for c in MESSAGES if issubclass(c, DeviceMessage)]
EXAMPLE: dict[type[WireModel], dict[str, Any]] = {
    cls: cls.json_schema()["examples"][0] for cls in MESSAGES
}
_KEY = ec.generate_private_key(ec.SECP256R1())
_KEY_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_FUZZ = settings(
    max_examples=EXAMPLES_PER_MESSAGE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _only_protocol_errors(cls: type[WireModel], data: bytes) -> None:
    """Parse; a parsed message must also encode, re-parse and (if signed) verify cleanly."""
    try:
        msg = cls.from_bytes(data)
    except ProtocolError:
        return
    again = msg.to_bytes()
    assert cls.from_bytes(again) == msg
    if isinstance(msg, enroll.EnrollRequest | enroll.RenewRequest):
        msg.signed_digest()
        with pytest.raises(ProtocolError):
            msg.verify(_KEY_PEM)  # no fuzzed document carries a signature by _KEY


# -- strategies -------------------------------------------------------------------------------

_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
_unicode = st.text(st.characters() | _surrogate, max_size=40)  # characters() has no Cs
_numbers = st.one_of(
    st.integers(),
    st.integers(-(2**80), 2**80),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -1, -(2**63) - 1]),
    st.floats(),  # NaN and infinities included
)
_scalar = st.one_of(st.none(), st.booleans(), _numbers, _unicode)
_value = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_unicode, inner, max_size=3),
    max_leaves=8,
)


def _field_edits(cls: type[WireModel]) -> st.SearchStrategy[dict[str, Any]]:
    """The class's example with one field changed, dropped, or an extra one added."""
    base = EXAMPLE[cls]
    names = sorted(base)
    plausible = [v for v in base.values() if not isinstance(v, list)]
    value = st.one_of(_value, st.sampled_from(plausible))
    return st.one_of(
        st.tuples(st.sampled_from(names), value).map(lambda t: {**base, t[0]: t[1]}),
        st.sampled_from(names).map(lambda k: {n: v for n, v in base.items() if n != k}),
        st.tuples(_unicode, value).map(lambda t: {**base, t[0]: t[1]}),
        st.dictionaries(st.sampled_from(names), value, min_size=2, max_size=4).map(
            lambda edits: {**base, **edits}
        ),
    )


def _encodings(doc: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Escaped (``\\ud800``), raw UTF-8 with surrogate bytes, or with non-finite numbers."""
    return st.sampled_from(
        [
            json.dumps(doc, ensure_ascii=True).encode(),
            json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass"),
            json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
        ]
    )


def _bombs(cls: type[WireModel]) -> st.SearchStrategy[bytes]:
    names = sorted(EXAMPLE[cls])
    return st.one_of(
        st.tuples(st.sampled_from(names), st.integers(100, 20_000)).map(
            lambda t: f'{{"{t[0]}":{"[" * t[1]}{"]" * t[1]}}}'.encode()
        ),
        st.tuples(st.sampled_from(names), st.integers(300, 6000)).map(
            lambda t: _with_raw(cls, t[0], "9" * t[1])
        ),
        st.tuples(
            st.sampled_from(names), st.sampled_from(["1e999", "-1e999", "NaN", "Infinity"])
        ).map(lambda t: _with_raw(cls, t[0], t[1])),
        st.integers(1, 70_000).map(lambda n: b'{"' + b"a" * n + b'":1}'),
        st.binary(max_size=300),
    )


def _with_raw(cls: type[WireModel], field: str, raw: str) -> bytes:
    """The example with ``field``'s value replaced by ``raw`` JSON text (huge numbers...)."""
    doc = {**EXAMPLE[cls], field: "@@RAW@@"}
    return json.dumps(doc).replace('"@@RAW@@"', raw).encode()


def _cases(strategy: Any) -> st.SearchStrategy[tuple[type[WireModel], bytes]]:
    return st.one_of(*(st.tuples(st.just(cls), strategy(cls)) for cls in MESSAGES))


# -- fuzz: only ProtocolError ----------------------------------------------------------------


@_FUZZ
@given(_cases(lambda cls: _field_edits(cls).flatmap(_encodings)))
def test_odd_field_values_raise_only_protocol_errors(case: tuple[type[WireModel], bytes]) -> None:
    _only_protocol_errors(*case)


@_FUZZ
@given(_cases(_bombs))
def test_nesting_huge_numbers_and_random_bytes_raise_only_protocol_errors(
    case: tuple[type[WireModel], bytes],
) -> None:
    _only_protocol_errors(*case)


@_FUZZ
@given(
    _cases(
        lambda cls: st.tuples(st.sampled_from(sorted(EXAMPLE[cls])), _surrogate).map(
            lambda t, cls=cls: json.dumps({**EXAMPLE[cls], t[0]: f"x{t[1]}"}).encode()
        )
    )
)
def test_a_lone_surrogate_in_any_field_is_malformed(case: tuple[type[WireModel], bytes]) -> None:
    cls, data = case
    with pytest.raises(MalformedError):
        cls.from_bytes(data)


# -- the enrollment canonicalisation (was: UnicodeEncodeError in the sidecar's thread) ----------


@pytest.mark.parametrize("cls", [enroll.EnrollRequest, enroll.RenewRequest, enroll.CertResponse])
@pytest.mark.parametrize("field", ["device_id", "nonce", "sig", "csr", "token"])
def test_enrollment_documents_with_a_lone_surrogate_are_malformed(
    cls: type[WireModel], field: str
) -> None:
    doc = {**EXAMPLE[cls], field: "\ud800"}
    for data in (
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),  # "\ud800" escape
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        ),
    ):
        with pytest.raises(MalformedError):
            cls.from_bytes(data)


def test_canonical_json_refuses_a_lone_surrogate_with_a_protocol_error() -> None:
    with pytest.raises(MalformedError):
        canonical_json({"device_id": "\ud800"})
    with pytest.raises(MalformedError):
        canonical_json({"x": float("nan")})


def test_a_message_cannot_be_built_with_a_lone_surrogate() -> None:
    with pytest.raises(ValidationError):
        Ack(
            batch_id="ab" * 16, seq=1, status="stored", reason="\ud800", digest="d" * 64,
            kid="0" * 16,
        )  # fmt: skip


# -- fixed cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_oversized_input_is_refused_before_parsing(cls: type[WireModel]) -> None:
    with pytest.raises(TooLargeError):
        cls.from_bytes(b" " * (cls.MAX_BYTES + 1))


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_non_bytes_input_is_malformed(cls: type[WireModel]) -> None:
    with pytest.raises(MalformedError):
        cls.from_bytes("{}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (Ack, "seq", 2**63),
        (Ack, "seq", True),
        (Ack, "seq", 1.0),
        (Ack, "seq", "1"),
        (Ack, "status", "eaten"),
        (OtaStatus, "adapter_version", -1),
        (OtaStatus, "device", "pi-07\n"),  # "$" is the end of the string, not before "\n"
        (Event, "score", 1.0001),
        (Event, "label", "speech"),
        (Telemetry, "readings", []),
        (Telemetry, "time_ms", 2**64),
        (enroll.CertResponse, "v", 2),
        (enroll.CertResponse, "v", True),
    ],
)
def test_out_of_contract_values_are_malformed(cls: type[WireModel], field: str, value: Any) -> None:
    data = json.dumps({**EXAMPLE[cls], field: value}, sort_keys=True, separators=(",", ":"))
    with pytest.raises(MalformedError):
        cls.from_bytes(data.encode())


def test_field_errors_keep_their_reasons() -> None:
    doc = {**EXAMPLE[enroll.EnrollRequest], "token": "short"}
    with pytest.raises(MalformedError) as e:
        enroll.EnrollRequest.from_bytes(canonical_json(doc))
    assert e.value.reason == "bad_token"
    doc = {**EXAMPLE[enroll.RenewRequest], "sig": "MAMCAQE="}  # base64, not strict DER
    with pytest.raises(MalformedError) as e:
        enroll.RenewRequest.from_bytes(canonical_json(doc))
    assert e.value.reason == "bad_signature"
    with pytest.raises(MalformedError) as e:
        Telemetry.from_bytes(canonical_json({**EXAMPLE[Telemetry], "device": "Pi!"}))
    assert e.value.reason == "bad_device_id"


def test_an_issued_certificate_response_must_carry_a_certificate() -> None:
    doc = {**EXAMPLE[enroll.CertResponse], "status": "issued", "reason": ""}
    with pytest.raises(MalformedError):
        enroll.CertResponse.from_bytes(canonical_json(doc))


def test_event_labels_are_the_model_classes() -> None:
    for label in CLASSES:
        Event.from_bytes(canonical_json({**EXAMPLE[Event], "label": label}))


# -- the device is the topic's ----------------------------------------------------------------


@pytest.mark.parametrize("cls", DEVICE_MESSAGES, ids=lambda c: c.__name__)
def test_a_device_message_naming_another_device_is_refused(cls: type[DeviceMessage]) -> None:
    payload = canonical_json({**EXAMPLE[cls], "device": "pi-a"})
    own = topics.device_topic("pi-a", cls.TOPIC_KIND)
    assert parse_device_message(own, payload, cls).device == "pi-a"
    with pytest.raises(MalformedError) as e:
        parse_device_message(topics.device_topic("pi-b", cls.TOPIC_KIND), payload, cls)
    assert e.value.reason == "device_mismatch"


def test_every_device_message_kind_is_covered() -> None:
    kinds = {cls.TOPIC_KIND for cls in DEVICE_MESSAGES}
    assert kinds >= {topics.OTA_STATUS, topics.EVENTS, topics.TELEMETRY}


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("fleet/v1/pi-a/events", "bad_topic"),  # an OTA status on the events topic
        ("fleet/v1/ota/ota/status", "bad_device_id"),  # reserved level as a device
        ("fleet/v1/labels/ota/status", "bad_device_id"),
        ("fleet/v1/a/b/ota/status", "bad_device_id"),
        ("fleet/v1/+/ota/status", "bad_device_id"),
        ("fleet/v2/pi-a/ota/status", "bad_topic"),
        ("fleet/v1//ota/status", "bad_topic"),
        ("fleet/v1/ota/status", "bad_topic"),
    ],
)
def test_a_device_message_on_a_wrong_topic_is_refused(topic: str, reason: str) -> None:
    payload = canonical_json({**EXAMPLE[OtaStatus], "device": "pi-a"})
    with pytest.raises(MalformedError) as e:
        parse_device_message(topic, payload, OtaStatus)
    assert e.value.reason == reason
