"""The outbox: seal buffered samples into signed, encrypted batches, send them, resend them.

Owns the device side of the upload path after the replay buffer: ``seal`` turns
unbatched samples into envelopes (AES-256-GCM, key wrapped for the cloud HSM, signed by
the TPM, carrying the buffer's sequence epoch; ``fleet_protocol.envelope``) committed to
the buffer *before* the first send; ``resend_due`` publishes every unacknowledged batch
again once it is due (``retry_s`` after its last send; after a ``retry`` ack, a backoff
doubling from ``retry_s`` up to ``retry_max_s``, recorded in the buffer so a restarted
daemon keeps waiting instead of resending at once); ``on_ack`` acts on the cloud's acks.

Invariants:
- a batch is committed to the buffer (crash-safe) before it is published, so a crash or
  an outage between seal and ack loses nothing: the batch is resent until acknowledged;
- a batch leaves the buffer's unacknowledged set only through ``on_ack``, and only for
  an ack signed by the sidecar's pinned ack key that names the SHA-256 of the exact
  envelope held for that batch id (docs/adr/0017): ``stored`` (delete) or ``rejected``
  (permanent: drop, counted by reason in ``stats.rejected``); a ``retry`` ack keeps the
  batch and backs off. Unsigned, forged or mismatched acks are counted
  (``stats.acks_unverified``) and change nothing; without a pinned key nothing is deleted;
- ``seal`` and ``resend_due`` run on the daemon's main loop; ``on_ack`` runs on the MQTT
  network thread and only touches the thread-safe buffer and locked dicts;
- a malformed ack is logged and counted, never raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_daemon.buffer import PendingBatch, ReplayBuffer
from edge_daemon.config import UplinkConfig
from fleet_protocol import batch, envelope, topics
from fleet_protocol.errors import ProtocolError, SignatureError
from fleet_protocol.messages import Ack

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]  # (topic, payload) -> the broker took it


@dataclass
class OutboxStats:
    batches_sealed: int = 0
    sends: int = 0
    resends: int = 0
    acks: int = 0
    acks_malformed: int = 0
    acks_unverified: int = 0  # unsigned, forged, or naming another envelope: ignored
    uplink_bytes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # dropped for good, by reason
    deferred: dict[str, int] = field(default_factory=dict)  # retry acks, by reason


class Signer(Protocol):
    """What the outbox needs of the key store (the TPM identity key)."""

    def signing_key_id(self) -> str: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


class Outbox:
    def __init__(
        self,
        *,
        device: str,
        buffer: ReplayBuffer,
        signer: Signer,
        unwrap_public_key_pem: bytes,
        publish: Publish,
        cfg: UplinkConfig,
        ack_public_key_pem: bytes | None,
    ) -> None:
        self.device = device
        self.buffer = buffer
        self.cfg = cfg
        self._ack_pem = ack_public_key_pem
        if ack_public_key_pem is None:
            log.error("no ack public key pinned: no batch will be deleted on any ack")
        self._signer = signer
        self._unwrap_pem = unwrap_public_key_pem
        self._kid_wrap = envelope.key_id_from_pem(unwrap_public_key_pem)
        self._publish = publish
        self._lock = threading.Lock()
        self._sent_at: dict[str, float] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # batch id -> (due at, delay)
        self._digests: dict[str, str] = {}  # batch id -> SHA-256 of its envelope
        self.stats = OutboxStats()
        self.acked = threading.Event()  # set on every new ack (the status report is stale)

    def set_unwrap_key(self, unwrap_public_key_pem: bytes) -> str:
        """Seal later batches for a rotated unwrap key; its id. Batches already sealed keep
        the key they were sealed for and are resent as they are: the sidecar keeps old
        unwrap keys for them (ADR 0002, tests/faults/test_unwrap_rotation_in_flight.py)."""
        kid = envelope.key_id_from_pem(unwrap_public_key_pem)
        self._unwrap_pem, self._kid_wrap = unwrap_public_key_pem, kid
        return kid

    def seal(self, force: bool = False) -> int:
        """Seal full batches (all pending samples with ``force``), send each; return count."""
        n = 0
        size = self.cfg.batch_samples
        while True:
            pending = self.buffer.unbatched(size)
            if not pending or (len(pending) < size and not force):
                return n
            metas = tuple(m for m, _ in pending)
            plain = batch.encode(batch.Batch(self.device, metas, np.stack([f for _, f in pending])))
            batch_id, seq = os.urandom(16).hex(), self.buffer.next_seq()
            now_ms = int(time.time() * 1000)
            sealed = envelope.seal(
                plain,
                device=self.device,
                batch_id=batch_id,
                seq=seq,
                created_at_ms=now_ms,
                wrap_public_key_pem=self._unwrap_pem,
                kid_wrap=self._kid_wrap,
                kid_sig=self._signer.signing_key_id(),
                sign_digest=self._signer.sign_digest,
                epoch=self.buffer.epoch(),
            )
            self.buffer.commit_batch(batch_id, seq, now_ms, sealed, [m.sample_id for m in metas])
            self.stats.batches_sealed += 1
            self._send(batch_id, sealed)
            n += 1

    def _send(self, batch_id: str, sealed: bytes) -> None:
        with self._lock:
            self._sent_at[batch_id] = time.monotonic()
            self._digests.setdefault(batch_id, hashlib.sha256(sealed).hexdigest())
        if self._publish(topics.upload(self.device), sealed):
            self.stats.sends += 1
            self.stats.uplink_bytes += len(sealed)

    def resend_due(self) -> int:
        """Publish again every unacknowledged batch that is due (``retry_s``, or backoff)."""
        now, n = time.monotonic(), 0
        for p in self.buffer.unacked():
            with self._lock:
                last = self._sent_at.get(p.batch_id, 0.0)
                backoff = self._backoff.get(p.batch_id) or self._restored(p)
            due = backoff[0] if backoff is not None else last + self.cfg.retry_s
            if now >= due:
                log.info(
                    "resending unacknowledged batch seq=%d", p.seq, extra={"batch": p.batch_id}
                )
                self._send(p.batch_id, p.envelope)
                self.stats.resends += 1
                n += 1
        return n

    def on_ack(self, payload: bytes) -> None:
        """An ack from the cloud (network thread): acted on only if signed and ours."""
        try:
            ack = Ack.from_bytes(payload)
        except ProtocolError as e:
            self.stats.acks_malformed += 1
            log.warning("ignored malformed ack: %s", e)
            return
        if not self._verified(ack):
            return
        if ack.status == "retry":
            self._defer(ack.batch_id, ack.reason)
            return
        if ack.status == "rejected":
            self.stats.rejected[ack.reason] = self.stats.rejected.get(ack.reason, 0) + 1
            log.error(
                "cloud refused batch %s for good: %s; dropped",
                ack.batch_id,
                ack.reason,
                extra={"batch": ack.batch_id},
            )
        if self.buffer.mark_acked(ack.batch_id):
            with self._lock:
                self._sent_at.pop(ack.batch_id, None)
                self._backoff.pop(ack.batch_id, None)
                self._digests.pop(ack.batch_id, None)
            self.stats.acks += 1
            self.acked.set()

    def _verified(self, ack: Ack) -> bool:
        """True if the pinned ack key signed ``ack`` and it names the envelope held."""
        why = ""
        if self._ack_pem is None:
            why = "no ack key pinned"
        else:
            try:
                ack.verify(self._ack_pem)
            except (SignatureError, ProtocolError) as e:
                why = str(e)
        if not why and ack.digest != self._digest_of(ack.batch_id):
            why = "it names another envelope, or a batch this device does not hold"
        if why:
            self.stats.acks_unverified += 1
            log.warning("ignored ack for batch %s: %s", ack.batch_id, why)
            return False
        return True

    def _digest_of(self, batch_id: str) -> str | None:
        with self._lock:
            known = self._digests.get(batch_id)
        if known is not None:
            return known
        for p in self.buffer.unacked():  # after a restart: from the buffer
            if p.batch_id == batch_id:
                digest = hashlib.sha256(p.envelope).hexdigest()
                with self._lock:
                    self._digests[batch_id] = digest
                return digest
        return None

    def _restored(self, p: PendingBatch) -> tuple[float, float] | None:
        """The backoff the buffer recorded for ``p`` before a restart (lock held): due no
        later than its delay from now, whatever the wall clock did meanwhile."""
        if p.retry_delay_s is None or p.retry_due_ms is None:
            return None
        left_s = (p.retry_due_ms - time.time() * 1000) / 1000
        delay = min(float(p.retry_delay_s), self.cfg.retry_max_s)
        backoff = (time.monotonic() + min(max(left_s, 0.0), delay), delay)
        self._backoff[p.batch_id] = backoff
        return backoff

    def _defer(self, batch_id: str, reason: str) -> None:
        """A transient refusal: keep the batch, resend after a doubling delay (persisted)."""
        self.stats.deferred[reason] = self.stats.deferred.get(reason, 0) + 1
        held = [p for p in self.buffer.unacked() if p.batch_id == batch_id]
        with self._lock:
            known = self._backoff.get(batch_id) or (self._restored(held[0]) if held else None)
            delay = min((known[1] if known else self.cfg.retry_s / 2) * 2, self.cfg.retry_max_s)
            self._backoff[batch_id] = (time.monotonic() + delay, delay)
        self.buffer.defer(batch_id, delay, int(time.time() * 1000 + delay * 1000))
        log.warning("cloud deferred batch %s (%s); resend in %.0f s", batch_id, reason, delay)
