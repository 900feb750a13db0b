"""The outbox: seal buffered samples into signed, encrypted batches, send them, resend them.

Owns the device side of the upload path after the replay buffer: ``seal`` turns
unbatched samples into envelopes (AES-256-GCM, key wrapped for the cloud HSM, signed by
the TPM; ``fleet_protocol.envelope``) committed to the buffer *before* the first send;
``resend_due`` publishes every unacknowledged batch again once ``retry_s`` has passed
since its last send; ``on_ack`` marks a batch acknowledged when the cloud says so.

Invariants:
- a batch is committed to the buffer (crash-safe) before it is published, so a crash or
  an outage between seal and ack loses nothing: the batch is resent until acknowledged;
- a batch leaves the buffer's unacknowledged set only through ``on_ack``;
- ``seal`` and ``resend_due`` run on the daemon's main loop; ``on_ack`` runs on the MQTT
  network thread and only touches the thread-safe buffer and a locked dict;
- a malformed ack is logged and counted, never raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.config import UplinkConfig
from fleet_protocol import batch, envelope, topics
from fleet_protocol.errors import ProtocolError
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
    uplink_bytes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.device = device
        self.buffer = buffer
        self.cfg = cfg
        self._signer = signer
        self._unwrap_pem = unwrap_public_key_pem
        self._kid_wrap = envelope.key_id_from_pem(unwrap_public_key_pem)
        self._publish = publish
        self._lock = threading.Lock()
        self._sent_at: dict[str, float] = {}
        self.stats = OutboxStats()
        self.acked = threading.Event()  # set on every new ack (the status report is stale)

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
            )
            self.buffer.commit_batch(batch_id, seq, now_ms, sealed, [m.sample_id for m in metas])
            self.stats.batches_sealed += 1
            self._send(batch_id, sealed)
            n += 1

    def _send(self, batch_id: str, sealed: bytes) -> None:
        with self._lock:
            self._sent_at[batch_id] = time.monotonic()
        if self._publish(topics.upload(self.device), sealed):
            self.stats.sends += 1
            self.stats.uplink_bytes += len(sealed)

    def resend_due(self) -> int:
        """Publish again every unacknowledged batch not sent within ``retry_s``."""
        now, n = time.monotonic(), 0
        for p in self.buffer.unacked():
            with self._lock:
                last = self._sent_at.get(p.batch_id, 0.0)
            if now - last >= self.cfg.retry_s:
                log.info(
                    "resending unacknowledged batch seq=%d", p.seq, extra={"batch": p.batch_id}
                )
                self._send(p.batch_id, p.envelope)
                self.stats.resends += 1
                n += 1
        return n

    def on_ack(self, payload: bytes) -> None:
        """An ack from the cloud (network thread)."""
        try:
            ack = Ack.from_bytes(payload)
        except ProtocolError as e:
            self.stats.acks_malformed += 1
            log.warning("ignored malformed ack: %s", e)
            return
        if ack.status == "rejected":
            self.stats.rejected[ack.reason] = self.stats.rejected.get(ack.reason, 0) + 1
            log.error(
                "cloud rejected batch %s: %s",
                ack.batch_id,
                ack.reason,
                extra={"batch": ack.batch_id},
            )
        if self.buffer.mark_acked(ack.batch_id):
            with self._lock:
                self._sent_at.pop(ack.batch_id, None)
            self.stats.acks += 1
            self.acked.set()
