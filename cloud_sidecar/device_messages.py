"""The devices' JSON messages beside uploads: OTA status, events and telemetry.

Owns their validation on the sidecar, their counters, and the audit entries for OTA
status and for refusals. Events and telemetry are not stored (no storage yet).

Invariants:
- the device is the topic's, which the broker's ACL authenticates (a device writes only
  under its own id), never the payload's: ``wire.parse_device_message`` refuses a
  payload naming another device (``device_mismatch``) before anything is counted as
  accepted or audited as the device's;
- a message counts as accepted only from a device registered and active in the store:
  a label source's or the sidecar's certificate CN matches the ACL's per-device
  patterns too, and the ``device`` metric label stays bounded by the registry;
- every refusal is counted in ``message_rejected_total{kind,reason}`` and audited as
  ``message.rejected``, at most ``AUDIT_BURST`` entries per device and ``AUDIT_WINDOW_S``
  (a device flooding bad messages costs counters, not one fsync each); refusals past
  that are counted in ``message_rejected_unaudited_total{kind}``;
- bounded work per message: one parse under the model's byte cap, one registry lookup,
  counter increments, and for an OTA status or a refusal one audit append.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store_api import DeviceRegistry
from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError
from fleet_protocol.messages import Event, OtaStatus
from fleet_protocol.telemetry import Telemetry
from fleet_protocol.wire import DeviceMessage, parse_device_message

log = logging.getLogger(__name__)

AUDIT_BURST = 10
AUDIT_WINDOW_S = 60.0
MAX_TRACKED_DEVICES = 10_000
MODELS: dict[str, type[DeviceMessage]] = {
    topics.OTA_STATUS: OtaStatus,
    topics.EVENTS: Event,
    topics.TELEMETRY: Telemetry,
}


class _AuditBudget:
    """At most ``burst`` audit entries per subject per ``window_s``; thread-safe."""

    def __init__(self, burst: int, window_s: float, clock: Callable[[], float]) -> None:
        self._burst, self._window, self._clock = burst, window_s, clock
        self._lock = threading.Lock()
        self._spent: dict[str, tuple[float, int]] = {}

    def take(self, subject: str) -> bool:
        now = self._clock()
        with self._lock:
            if len(self._spent) >= MAX_TRACKED_DEVICES and subject not in self._spent:
                self._spent.clear()  # bounded memory; at worst a burst more is audited
            start, used = self._spent.get(subject, (now, 0))
            if now - start >= self._window:
                start, used = now, 0
            if used >= self._burst:
                return False
            self._spent[subject] = (start, used + 1)
            return True


class DeviceMessages:
    """Validates, counts and audits OTA status, events and telemetry (MQTT network thread)."""

    def __init__(
        self,
        store: DeviceRegistry,
        audit: AuditLog,
        metrics: Metrics,
        *,
        audit_burst: int = AUDIT_BURST,
        audit_window_s: float = AUDIT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self._rollout: dict[str, tuple[str, str]] = {}  # device → last (version, state)
        self._budget = _AuditBudget(audit_burst, audit_window_s, clock)

    def handle(self, topic: str, payload: bytes) -> DeviceMessage | None:
        """The accepted message, or None when it was refused (counted, maybe audited)."""
        kind = topics.kind_of(topic) or "?"
        device: str | None = None
        try:
            model = MODELS.get(kind)
            if model is None:
                raise MalformedError(f"not a device message topic: {topic[:120]!r}", "bad_topic")
            device = topics.device_of(topic, kind)
            msg = parse_device_message(topic, payload, model)
            record = self.store.device(device)
            if record is None:
                raise SignatureError(f"unknown device {device!r}", "unknown_device")
            if record.status != "active":
                raise SignatureError(f"device {device!r} is {record.status}", "revoked_device")
        except ProtocolError as e:
            self._reject(kind, device, e)
            return None
        self._accept(msg)
        return msg

    def _accept(self, msg: DeviceMessage) -> None:
        if isinstance(msg, OtaStatus):
            self.metrics.inc("ota_status_total", state=msg.state)
            self._rollout[msg.device] = (str(msg.adapter_version), msg.state)
            self.metrics.clear("rollout_devices")
            for version, state in set(self._rollout.values()):
                n = sum(1 for v in self._rollout.values() if v == (version, state))
                self.metrics.set("rollout_devices", n, adapter_version=version, state=state)
            self.audit.append(
                "ota.device_status",
                msg.device,
                state=msg.state,
                adapter_version=msg.adapter_version,
                reason=msg.reason,
            )
        elif isinstance(msg, Event):
            self.metrics.inc("events_total", device=msg.device, label=msg.label)
        elif isinstance(msg, Telemetry):
            self.metrics.inc("telemetry_messages_total", device=msg.device)
            self.metrics.inc("telemetry_readings_total", len(msg.readings), device=msg.device)

    def _reject(self, kind: str, device: str | None, e: ProtocolError) -> None:
        log.warning("refused a %s message from %s (%s): %s", kind, device or "?", e.reason, e)
        self.metrics.inc("message_rejected_total", kind=kind, reason=e.reason)
        subject = device or "?"
        if not self._budget.take(subject):
            self.metrics.inc("message_rejected_unaudited_total", kind=kind)
            return
        self.audit.append(
            "message.rejected", subject, topic_kind=kind, reason=e.reason, detail=str(e)[:300]
        )


__all__ = ["MODELS", "DeviceMessages"]
