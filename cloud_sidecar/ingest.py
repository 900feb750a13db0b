"""Ingest: turn one upload message into a stored batch or a recorded rejection.

Order of checks (cheapest and least trusting first): topic → envelope structure and
byte caps → header device equals the broker-authenticated topic device → device known
and active → device signature → unwrap key id → replay (batch id, sequence) → HSM
unwrap → AEAD decrypt → batch parse → one-transaction store → ack.

Invariants: a rejection stores nothing, is logged, counted by reason in
``ingest_rejected_total`` and written to the audit log, and never stops the worker.
When the HSM is unavailable nothing is stored or acknowledged: the device keeps the
batch and sends it again (``HsmUnavailableError`` propagates to the caller).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import HsmUnavailableError
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store_api import BatchSink
from fleet_protocol import batch, envelope, topics
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError, TooLargeError
from fleet_protocol.messages import Ack, AckStatus

log = logging.getLogger(__name__)


class Unwrapper(Protocol):
    def unwrap_key_id(self) -> str: ...

    def decrypt_oaep(self, wrapped: bytes) -> bytes: ...


@dataclass(frozen=True)
class IngestResult:
    device: str | None
    batch_id: str | None
    status: str  # stored | duplicate | rejected
    reason: str = ""
    n_samples: int = 0


class Ingest:
    def __init__(
        self,
        store: BatchSink,
        hsm: Unwrapper,
        audit: AuditLog,
        metrics: Metrics,
        publish: Callable[[str, bytes], None],
        max_upload_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.hsm = hsm
        self.audit = audit
        self.metrics = metrics
        self._publish = publish
        self._limits = envelope.EnvelopeLimits(max_total=max_upload_bytes)

    def handle(self, topic: str, payload: bytes) -> IngestResult:
        device: str | None = None
        env: envelope.Envelope | None = None
        try:
            device = topics.device_of_upload(topic)
            if len(payload) > self._limits.max_total:
                raise TooLargeError(
                    f"upload of {len(payload)} bytes exceeds {self._limits.max_total}"
                )
            env = envelope.parse(payload, self._limits)
            h = env.header
            if h.device != device:
                raise MalformedError(
                    f"header names {h.device!r} on {device!r}'s topic", "device_mismatch"
                )
            record = self.store.device(device)
            if record is None:
                raise SignatureError(f"unknown device {device!r}", "unknown_device")
            if record.status != "active":
                raise SignatureError(f"device {device!r} is {record.status}", "revoked_device")
            if h.kid_sig != record.key_id:
                raise SignatureError("signed with a key that is not the device's", "unknown_key")
            envelope.verify_signature(env, record.public_key_pem)
            if h.kid_wrap != self.hsm.unwrap_key_id():
                raise MalformedError("wrapped for a key this sidecar does not hold", "unknown_key")
            digest = hashlib.sha256(payload).hexdigest()
            if not self.store.check_fresh(device, h.batch_id, h.seq, digest):
                self.metrics.inc("ingest_duplicates_total")
                self._ack(device, h.batch_id, h.seq, "stored", "duplicate")
                return IngestResult(device, h.batch_id, "duplicate")
            plain = envelope.open_envelope(env, lambda wrapped: self._unwrap(device, h, wrapped))
            parsed = batch.decode_or_raise(plain)
            if parsed.device != device:
                raise MalformedError("batch manifest names another device", "device_mismatch")
            self.store.put_batch(h.batch_id, h.seq, digest, parsed)
        except HsmUnavailableError:
            self.metrics.inc("ingest_hsm_unavailable_total")
            log.error("HSM unavailable; upload from %s left for the device to resend", device)
            raise
        except ProtocolError as e:
            return self._reject(device, env, e.reason, str(e))
        n = len(parsed.samples)
        self.metrics.inc("ingest_batches_total", device=device)
        self.metrics.inc("ingest_samples_total", n, device=device)
        self.audit.append(
            "ingest.stored",
            device,
            batch_id=h.batch_id,
            seq=h.seq,
            samples=n,
            digest=digest,
            unwrap_key=h.kid_wrap,
            decrypted=h.aead,
            region=self.store.region,
        )
        self._ack(device, h.batch_id, h.seq, "stored", "")
        log.debug("stored batch %s (%d samples) from %s", h.batch_id, n, device)
        return IngestResult(device, h.batch_id, "stored", n_samples=n)

    def _unwrap(self, device: str, h: envelope.EnvelopeHeader, wrapped: bytes) -> bytes:
        """One HSM operation, audited whether it succeeds or not (key custody trail)."""
        try:
            key = self.hsm.decrypt_oaep(wrapped)
        except Exception as e:
            self.audit.append(
                "hsm.unwrap",
                device,
                batch_id=h.batch_id,
                key_id=h.kid_wrap,
                ok=False,
                error=type(e).__name__,
            )
            raise
        self.audit.append(
            "hsm.unwrap", device, batch_id=h.batch_id, key_id=h.kid_wrap, ok=True, mechanism=h.wrap
        )
        return key

    def _reject(
        self, device: str | None, env: envelope.Envelope | None, reason: str, detail: str
    ) -> IngestResult:
        batch_id = env.header.batch_id if env is not None else None
        log.warning("rejected upload from %s (%s): %s", device, reason, detail)
        self.metrics.inc("ingest_rejected_total", reason=reason)
        self.audit.append(
            "ingest.rejected", device or "?", reason=reason, detail=detail[:300], batch_id=batch_id
        )
        if device is not None and env is not None:
            self._ack(device, env.header.batch_id, env.header.seq, "rejected", reason)
        return IngestResult(device, batch_id, "rejected", reason)

    def _ack(self, device: str, batch_id: str, seq: int, status: AckStatus, reason: str) -> None:
        self._publish(
            topics.ack(device),
            Ack(batch_id=batch_id, seq=seq, status=status, reason=reason).to_bytes(),
        )
