"""Ingest: turn one upload message into a stored batch or a recorded rejection.

Order of checks (cheapest and least trusting first): topic → envelope structure and
byte caps → header device equals the broker-authenticated topic device → device known
and active → device signature → unwrap key id (any key the HSM holds: current or
rotated, ADR 0002) → replay (batch id; sequence within the device's window for its
epoch, docs/adr/0017) → HSM unwrap → AEAD decrypt → batch parse → one-transaction
store → signed ack.

Invariants:
- every ack is signed by the sidecar's ack key and names the SHA-256 of the envelope
  it is about; a device deletes a batch only on such an ack (docs/adr/0017);
- a permanent refusal (forged, malformed, replayed, stale) stores nothing, is logged,
  counted by reason in ``ingest_rejected_total``, audited, and acked ``rejected``;
- a transient one (an unwrap key this sidecar does not hold, a token error that does not
  prove the data bad, a store that cannot write) stores nothing, is counted in
  ``ingest_deferred_total``, audited, and acked ``retry``: the device keeps the batch;
- when the HSM is unavailable nothing is stored or acknowledged (no ack can be signed):
  the device keeps the batch and sends it again (``HsmUnavailableError`` propagates);
- with a residual speech scanner (``data.speech_scanner``), every window is scored
  before it is stored; flagged windows are never stored (the rest of the batch is),
  counted in ``ingest_residual_speech_total``, audited (``ingest.residual_speech``:
  sample ids and scores, no features) and the batch is acked ``stored`` so the device
  deletes its copy too. The dataset build scans again (``cloud_sidecar.dataset``);
- nothing here stops the worker.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import (
    HsmDecryptError,
    HsmUnavailableError,
    StoreError,
    TransientIngestError,
)
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.residual_scan import SpeechScanner
from cloud_sidecar.store_api import BatchSink
from fleet_protocol import batch, envelope, topics
from fleet_protocol.errors import MalformedError, ProtocolError, SignatureError, TooLargeError
from fleet_protocol.messages import Ack, AckStatus

log = logging.getLogger(__name__)


class Unwrapper(Protocol):
    def unwrap_key_ids(self) -> tuple[str, ...]:
        """Every unwrap key the HSM holds (current first, then rotated ones)."""

    def decrypt_oaep(self, wrapped: bytes, key_id: str) -> bytes: ...


class AckSigner(Protocol):
    """The sidecar's ack key (in the HSM): signs the SHA-256 digest of an ack."""

    def ack_key_id(self) -> str: ...

    def sign_ack_digest(self, digest: bytes) -> bytes: ...


# a refusal's ack: a rejected batch may be dropped, a deferred one is kept and resent
_ACK_STATUS: dict[str, AckStatus] = {"rejected": "rejected", "deferred": "retry"}


@dataclass(frozen=True)
class IngestResult:
    device: str | None
    batch_id: str | None
    status: str  # stored | duplicate | rejected | deferred
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
        *,
        signer: AckSigner,
        scanner: SpeechScanner | None = None,
    ) -> None:
        self.store = store
        self.hsm = hsm
        self.signer = signer
        self.audit = audit
        self.metrics = metrics
        self._publish = publish
        self._limits = envelope.EnvelopeLimits(max_total=max_upload_bytes)
        self.scanner = scanner

    def handle(self, topic: str, payload: bytes) -> IngestResult:
        device: str | None = None
        env: envelope.Envelope | None = None
        digest = hashlib.sha256(payload).hexdigest()
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
            if h.kid_wrap not in self.hsm.unwrap_key_ids():
                raise TransientIngestError(
                    f"wrapped for unwrap key {h.kid_wrap}, not held here", "unknown_unwrap_key"
                )
            if not self._check_fresh(device, h, digest):
                self.metrics.inc("ingest_duplicates_total")
                self._ack(device, h, digest, "stored", "duplicate")
                return IngestResult(device, h.batch_id, "duplicate")
            plain = envelope.open_envelope(env, lambda wrapped: self._unwrap(device, h, wrapped))
            parsed = batch.decode_or_raise(plain)
            if parsed.device != device:
                raise MalformedError("batch manifest names another device", "device_mismatch")
            parsed, flagged = self._scan(parsed)
            try:
                self.store.put_batch(h.batch_id, h.seq, digest, parsed, epoch=h.epoch)
            except StoreError as e:
                raise TransientIngestError(str(e), "store_unavailable") from e
        except HsmUnavailableError:
            self.metrics.inc("ingest_hsm_unavailable_total")
            log.error("HSM unavailable; upload from %s left for the device to resend", device)
            raise
        except TransientIngestError as e:
            return self._defer(device, env, digest, e.reason, str(e))
        except ProtocolError as e:
            return self._reject(device, env, digest, e.reason, str(e))
        n = len(parsed.samples)
        if flagged:
            self._quarantined(device, h.batch_id, flagged, n)
        self.metrics.inc("ingest_batches_total", device=device)
        self.metrics.inc("ingest_samples_total", n, device=device)
        self.audit.append(
            "ingest.stored",
            device,
            batch_id=h.batch_id,
            seq=h.seq,
            epoch=h.epoch,
            samples=n,
            digest=digest,
            unwrap_key=h.kid_wrap,
            decrypted=h.aead,
            region=self.store.region,
        )
        self._ack(device, h, digest, "stored", "")
        log.debug("stored batch %s (%d samples) from %s", h.batch_id, n, device)
        return IngestResult(device, h.batch_id, "stored", n_samples=n)

    def _scan(self, parsed: batch.Batch) -> tuple[batch.Batch, list[tuple[str, float]]]:
        """``parsed`` without the windows the scanner flags, and (sample id, score) of those."""
        if self.scanner is None or not parsed.samples:
            return parsed, []
        scores = self.scanner.scores(np.asarray(parsed.features, dtype=np.float32))
        keep = scores < self.scanner.threshold
        if keep.all():
            return parsed, []
        flagged = [
            (m.sample_id, round(float(sc), 4))
            for m, sc, k in zip(parsed.samples, scores, keep, strict=True)
            if not k
        ]
        kept = tuple(m for m, k in zip(parsed.samples, keep, strict=True) if k)
        return replace(parsed, samples=kept, features=parsed.features[keep]), flagged

    def _quarantined(
        self, device: str, batch_id: str, flagged: list[tuple[str, float]], kept: int
    ) -> None:
        self.metrics.inc("ingest_residual_speech_total", len(flagged), device=device)
        self.audit.append(
            "ingest.residual_speech",
            device,
            batch_id=batch_id,
            quarantined=len(flagged),
            kept=kept,
            samples=[{"sample_id": sid, "score": sc} for sid, sc in flagged[:64]],
        )
        log.warning(
            "residual speech scan: %d window(s) of batch %s from %s not stored",
            len(flagged),
            batch_id,
            device,
        )

    def _check_fresh(self, device: str, h: envelope.EnvelopeHeader, digest: str) -> bool:
        try:
            return self.store.check_fresh(device, h.batch_id, h.seq, digest, epoch=h.epoch)
        except StoreError as e:
            raise TransientIngestError(str(e), "store_unavailable") from e

    def _unwrap(self, device: str, h: envelope.EnvelopeHeader, wrapped: bytes) -> bytes:
        """One HSM operation, audited whether it succeeds or not (key custody trail)."""
        try:
            key = self.hsm.decrypt_oaep(wrapped, h.kid_wrap)
        except Exception as e:
            self.metrics.inc("hsm_unwraps_total", result="error")
            self.audit.append(
                "hsm.unwrap",
                device,
                batch_id=h.batch_id,
                key_id=h.kid_wrap,
                ok=False,
                error=type(e).__name__,
            )
            if isinstance(e, HsmDecryptError) and e.transient:
                raise TransientIngestError(f"token error during unwrap: {e}", "hsm_error") from e
            raise
        self.metrics.inc("hsm_unwraps_total", result="ok")
        self.audit.append(
            "hsm.unwrap", device, batch_id=h.batch_id, key_id=h.kid_wrap, ok=True, mechanism=h.wrap
        )
        return key

    def _reject(
        self,
        device: str | None,
        env: envelope.Envelope | None,
        digest: str,
        reason: str,
        detail: str,
    ) -> IngestResult:
        """A permanent refusal: the device may drop the batch (acked ``rejected``)."""
        return self._refuse("rejected", device, env, digest, reason, detail)

    def _defer(
        self,
        device: str | None,
        env: envelope.Envelope | None,
        digest: str,
        reason: str,
        detail: str,
    ) -> IngestResult:
        """A transient refusal: the device keeps the batch and resends (acked ``retry``)."""
        return self._refuse("deferred", device, env, digest, reason, detail)

    def _refuse(
        self,
        outcome: str,
        device: str | None,
        env: envelope.Envelope | None,
        digest: str,
        reason: str,
        detail: str,
    ) -> IngestResult:
        batch_id = env.header.batch_id if env is not None else None
        log.warning("%s upload from %s (%s): %s", outcome, device, reason, detail)
        self.metrics.inc(f"ingest_{outcome}_total", reason=reason)
        self.audit.append(
            f"ingest.{outcome}",
            device or "?",
            reason=reason,
            detail=detail[:300],
            batch_id=batch_id,
        )
        if device is not None and env is not None:
            self._ack(device, env.header, digest, _ACK_STATUS[outcome], reason)
        return IngestResult(device, batch_id, outcome, reason)

    def _ack(
        self,
        device: str,
        h: envelope.EnvelopeHeader,
        digest: str,
        status: AckStatus,
        reason: str,
    ) -> None:
        """Sign and publish one ack; ``HsmUnavailableError`` if the ack key cannot sign."""
        ack = Ack(
            batch_id=h.batch_id,
            seq=h.seq,
            status=status,
            reason=reason,
            digest=digest,
            kid=self.signer.ack_key_id(),
        )
        self._publish(topics.ack(device), ack.signed(self.signer.sign_ack_digest).to_bytes())
