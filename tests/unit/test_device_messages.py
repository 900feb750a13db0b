"""The sidecar's handling of OTA status, events and telemetry (cloud_sidecar.device_messages).

A message naming another device than its topic is refused, counted and audited, and
nothing of it is counted as accepted; so are unknown and revoked devices and malformed
payloads; the audit entries for refusals are bounded per device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar.audit import AuditLog, verify
from cloud_sidecar.device_messages import DeviceMessages
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from fleet_protocol import topics
from fleet_protocol.messages import Event, OtaStatus
from fleet_protocol.telemetry import Telemetry
from fleet_protocol.wire import WireModel, canonical_json

PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)


@dataclass
class Sidecar:
    handler: DeviceMessages
    store: Store
    audit: AuditLog
    metrics: Metrics
    now: list[float]

    def audit_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.path.read_text().splitlines()]


@pytest.fixture
def sidecar(tmp_path: Path) -> Sidecar:
    store = Store(tmp_path / "store.sqlite3", "eu-central-1")
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    metrics, now = Metrics(), [0.0]
    for device in ("pi-a", "pi-b", "pi-gone"):
        store.register_device(device, PEM)
    store.set_device_status("pi-gone", "disabled")
    handler = DeviceMessages(store, audit, metrics, audit_burst=3, clock=lambda: now[0])
    return Sidecar(handler, store, audit, metrics, now)


def _payload(cls: type[WireModel], device: str) -> bytes:
    return canonical_json({**cls.json_schema()["examples"][0], "device": device})


KINDS = [(OtaStatus, topics.ota_status), (Event, topics.events), (Telemetry, topics.telemetry)]


@pytest.mark.parametrize(("cls", "topic"), KINDS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_message_naming_another_device_is_refused_counted_and_audited(
    sidecar: Sidecar, cls: type[WireModel], topic: Any
) -> None:
    kind = cls.TOPIC_KIND  # type: ignore[attr-defined]
    assert sidecar.handler.handle(topic("pi-a"), _payload(cls, "pi-b")) is None
    assert sidecar.metrics.get("message_rejected_total", kind=kind, reason="device_mismatch") == 1
    last = sidecar.audit_entries()[-1]
    assert (last["kind"], last["subject"]) == ("message.rejected", "pi-a")
    assert last["details"]["reason"] == "device_mismatch"
    assert last["details"]["topic_kind"] == kind
    # nothing of it was accepted: no OTA status audited, no event or telemetry counted
    kinds = [e["kind"] for e in sidecar.audit_entries()]
    assert "ota.device_status" not in kinds
    assert "sidecar_events_total{" not in sidecar.metrics.render()  # no sample, only HELP
    assert "sidecar_telemetry_messages_total{" not in sidecar.metrics.render()
    assert verify(sidecar.audit.path) == 1


def test_valid_messages_are_counted_per_device_and_label(sidecar: Sidecar) -> None:
    h = sidecar.handler
    assert isinstance(h.handle(topics.events("pi-a"), _payload(Event, "pi-a")), Event)
    assert isinstance(h.handle(topics.events("pi-a"), _payload(Event, "pi-a")), Event)
    assert isinstance(h.handle(topics.telemetry("pi-b"), _payload(Telemetry, "pi-b")), Telemetry)
    status = h.handle(topics.ota_status("pi-b"), _payload(OtaStatus, "pi-b"))
    assert isinstance(status, OtaStatus)
    m = sidecar.metrics
    assert m.get("events_total", device="pi-a", label="siren") == 2
    assert m.get("telemetry_messages_total", device="pi-b") == 1
    assert m.get("telemetry_readings_total", device="pi-b") == 2
    assert m.get("ota_status_total", state="rejected") == 1
    assert [e["kind"] for e in sidecar.audit_entries()] == ["ota.device_status"]
    assert sidecar.audit_entries()[0]["subject"] == "pi-b"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (topics.events("pi-x"), _payload(Event, "pi-x"), "unknown_device"),
        (topics.events("pi-gone"), _payload(Event, "pi-gone"), "revoked_device"),
        (topics.events("pi-a"), b'{"device":"pi-a"}', "malformed"),
        (topics.events("pi-a"), b"\xff" * 20_000, "too_large"),
        (topics.telemetry("pi-a"), _payload(Event, "pi-a"), "malformed"),
        ("fleet/v1/labels/events", _payload(Event, "labels"), "bad_device_id"),
        (topics.upload("pi-a"), b"", "bad_topic"),
    ],
)
def test_unknown_revoked_and_malformed_messages_are_refused(
    sidecar: Sidecar, topic: str, payload: bytes, reason: str
) -> None:
    assert sidecar.handler.handle(topic, payload) is None
    rendered = sidecar.metrics.render()
    assert f'reason="{reason}"' in rendered and "message_rejected_total" in rendered
    assert sidecar.audit_entries()[-1]["details"]["reason"] == reason


def test_refusals_are_audited_at_most_a_burst_per_device_and_window(sidecar: Sidecar) -> None:
    bad = _payload(Event, "pi-b")
    for _ in range(5):
        sidecar.handler.handle(topics.events("pi-a"), bad)
    sidecar.handler.handle(topics.events("pi-b"), _payload(Event, "pi-a"))  # another device
    m = sidecar.metrics
    assert m.get("message_rejected_total", kind="events", reason="device_mismatch") == 6
    assert m.get("message_rejected_unaudited_total", kind="events") == 2
    subjects = [e["subject"] for e in sidecar.audit_entries()]
    assert subjects == ["pi-a"] * 3 + ["pi-b"]
    sidecar.now[0] += 61  # a new window
    sidecar.handler.handle(topics.events("pi-a"), bad)
    assert [e["subject"] for e in sidecar.audit_entries()][-1] == "pi-a"
    assert len(sidecar.audit_entries()) == 5
