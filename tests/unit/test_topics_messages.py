"""Topic names, the device id rule, and the control messages' strict parsing."""

from __future__ import annotations

import pytest

from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, ProtocolError, TooLargeError
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


def test_ack_round_trips() -> None:
    ack = Ack(batch_id="a" * 32, seq=3, status="stored", reason="")
    assert Ack.from_bytes(ack.to_bytes()) == ack


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
