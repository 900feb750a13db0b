"""The device outbox paired in memory with the cloud's ingest (h11 style): out-of-order
delivery, a wiped device's new epoch, signed acks, retry acks with backoff.

Software keys stand in for the TPM and the HSM (their real paths are in
tests/integration); the replay buffer is the in-memory reference store, the cloud store
a real SQLite file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.ingest import Ingest
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from edge_daemon.buffer import MemoryReplayStore
from edge_daemon.config import UplinkConfig
from edge_daemon.uplink import Outbox
from fleet_protocol import topics
from fleet_protocol.batch import SampleMeta
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.messages import Ack
from tests.unit.store_keys import memory_data_keys
from tests.unit.test_ingest import FakeHsm, _pem

DEVICE = "pi-00"


class SoftSigner:
    """The TPM identity key's role, in software."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def signing_key_id(self) -> str:
        return key_id_from_pem(_pem(self.key))

    def sign_digest(self, digest: bytes) -> bytes:
        return self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@dataclass
class Pair:
    outbox: Outbox
    buffer: MemoryReplayStore
    ingest: Ingest
    store: Store
    hsm: FakeHsm
    signer: SoftSigner
    wire: list[bytes]  # uploads the device published, not yet delivered
    acks: list[bytes]  # acks the cloud published, in order

    def deliver(self, order: list[int] | None = None) -> None:
        batch, self.wire[:] = list(self.wire), []
        for i in order if order is not None else range(len(batch)):
            self.ingest.handle(topics.upload(DEVICE), batch[i])

    def add(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            meta = SampleMeta(
                sample_id=f"{i:032x}", captured_at_ms=1_700_000_000_000 + i,
                stream_offset_s=float(i), predicted="horn", score=0.4,
                model_sha256="ab" * 32, reason="low_confidence",
            )  # fmt: skip
            self.buffer.add(meta, np.zeros((N_BANDS, N_FRAMES), np.float16))


def _outbox(buffer: MemoryReplayStore, signer: SoftSigner, hsm: FakeHsm, wire: list[bytes],
            ack_pem: bytes | None, retry_s: float = 60.0) -> Outbox:  # fmt: skip
    return Outbox(
        device=DEVICE,
        buffer=buffer,
        signer=signer,
        unwrap_public_key_pem=_pem(hsm.key),
        publish=lambda _t, p: wire.append(p) is None,
        cfg=UplinkConfig(batch_samples=2, retry_s=retry_s, retry_max_s=4 * retry_s),
        ack_public_key_pem=ack_pem,
    )


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    hsm, signer, buffer = FakeHsm(), SoftSigner(), MemoryReplayStore()
    store = Store(tmp_path / "store.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    store.register_device(DEVICE, _pem(signer.key))
    wire: list[bytes] = []
    acks: list[bytes] = []
    outbox = _outbox(buffer, signer, hsm, wire, _pem(hsm.ack_key))
    paired: list[Pair] = []

    def publish(_topic: str, payload: bytes) -> None:  # the broker: to the current outbox
        acks.append(payload)
        paired[0].outbox.on_ack(payload)

    ingest = Ingest(
        store, hsm, AuditLog(tmp_path / "audit.jsonl", "eu-central-1"), Metrics(), publish,
        signer=hsm,
    )  # fmt: skip
    paired.append(Pair(outbox, buffer, ingest, store, hsm, signer, wire, acks))
    return paired[0]


def _stored(p: Pair) -> int:
    return p.store.counts()["batches"]


def test_batches_delivered_in_reverse_order_are_all_stored_once_and_deleted(pair: Pair) -> None:
    pair.add(6)
    assert pair.outbox.seal() == 3
    pair.deliver([2, 0, 1])
    assert _stored(pair) == 3 and pair.buffer.unacked() == []
    assert pair.outbox.stats.rejected == {} and pair.outbox.stats.acks == 3


def test_a_wiped_device_uploads_from_sequence_0_again_and_nothing_is_lost(pair: Pair) -> None:
    pair.add(4)
    pair.outbox.seal()
    pair.deliver()
    wiped = MemoryReplayStore()  # state wiped: new buffer, new epoch, seq from 0
    pair.outbox = _outbox(wiped, pair.signer, pair.hsm, pair.wire, _pem(pair.hsm.ack_key))
    pair.buffer = wiped
    pair.add(2, start=100)
    pair.outbox.seal()
    assert wiped.unacked()[0].seq == 0
    pair.deliver()
    assert _stored(pair) == 3 and wiped.unacked() == []


def _held_ack(p: Pair, **change: object) -> Ack:
    [held] = p.buffer.unacked()
    fields: dict[str, object] = {
        "batch_id": held.batch_id, "seq": held.seq, "status": "stored", "reason": "",
        "digest": hashlib.sha256(held.envelope).hexdigest(), "kid": p.hsm.ack_key_id(),
    }  # fmt: skip
    return Ack.model_validate(fields | change)


def test_unsigned_forged_or_mismatched_acks_delete_nothing_and_are_counted(pair: Pair) -> None:
    pair.add(2)
    pair.outbox.seal()
    other = ec.generate_private_key(ec.SECP256R1())
    forgeries = [
        _held_ack(pair),  # unsigned: what anyone who can publish on the topic could send
        _held_ack(pair).signed(lambda d: other.sign(d, ec.ECDSA(Prehashed(hashes.SHA256())))),
        _held_ack(pair, digest="0" * 64).signed(pair.hsm.sign_ack_digest),  # another envelope
        _held_ack(pair, status="rejected", reason="bad_signature"),
    ]
    for ack in forgeries:
        pair.outbox.on_ack(ack.to_bytes())
    assert len(pair.buffer.unacked()) == 1
    assert pair.outbox.stats.acks_unverified == 4 and pair.outbox.stats.acks == 0
    pair.outbox.on_ack(_held_ack(pair).signed(pair.hsm.sign_ack_digest).to_bytes())
    assert pair.buffer.unacked() == []


def test_without_a_pinned_ack_key_nothing_is_ever_deleted(pair: Pair) -> None:
    pair.outbox = _outbox(pair.buffer, pair.signer, pair.hsm, pair.wire, None)
    pair.add(2)
    pair.outbox.seal()
    pair.outbox.on_ack(_held_ack(pair).signed(pair.hsm.sign_ack_digest).to_bytes())
    assert len(pair.buffer.unacked()) == 1 and pair.outbox.stats.acks_unverified == 1


def test_a_permanent_refusal_drops_the_batch_and_counts_it(pair: Pair) -> None:
    pair.add(2)
    pair.outbox.seal()
    ack = _held_ack(pair, status="rejected", reason="decrypt_failed")
    pair.outbox.on_ack(ack.signed(pair.hsm.sign_ack_digest).to_bytes())
    assert pair.buffer.unacked() == [] and pair.outbox.stats.rejected == {"decrypt_failed": 1}


def test_a_retry_ack_keeps_the_batch_and_backs_off_before_resending(pair: Pair) -> None:
    pair.outbox = _outbox(pair.buffer, pair.signer, pair.hsm, pair.wire,
                          _pem(pair.hsm.ack_key), retry_s=0.2)  # fmt: skip
    pair.add(2)
    pair.outbox.seal()
    pair.hsm.fail_transiently = 2  # the token answers CKR_GENERAL_ERROR twice
    pair.deliver()
    assert len(pair.buffer.unacked()) == 1 and pair.outbox.stats.deferred == {"hsm_error": 1}
    assert pair.outbox.resend_due() == 0  # backing off: 0.2 s
    time.sleep(0.25)
    assert pair.outbox.resend_due() == 1
    pair.deliver()  # second transient failure: the delay doubles
    time.sleep(0.25)
    assert pair.outbox.resend_due() == 0
    time.sleep(0.2)
    assert pair.outbox.resend_due() == 1
    pair.deliver()
    assert pair.buffer.unacked() == [] and _stored(pair) == 1


def test_a_retry_backoff_is_kept_in_the_buffer_and_a_restarted_daemon_does_not_resend_early(
    pair: Pair, tmp_path: Path
) -> None:
    from edge_daemon.buffer import SqliteReplayStore

    key = b"k" * 32
    buffer = SqliteReplayStore(tmp_path / "buffer.sqlite3", key)
    pair.buffer = buffer  # type: ignore[assignment]
    pair.outbox = _outbox(buffer, pair.signer, pair.hsm, pair.wire,  # type: ignore[arg-type]
                          _pem(pair.hsm.ack_key), retry_s=0.5)  # fmt: skip
    pair.add(2)
    pair.outbox.seal()
    pair.hsm.fail_transiently = 2
    pair.deliver()  # retry: 0.5 s
    time.sleep(0.55)
    assert pair.outbox.resend_due() == 1
    pair.deliver()  # retry again: the delay doubles to 1 s
    (held,) = buffer.unacked()
    assert held.retry_delay_s == 1.0 and held.retry_due_ms is not None
    buffer.close()

    restarted = SqliteReplayStore(tmp_path / "buffer.sqlite3", key)  # the daemon restarts
    pair.buffer = restarted  # type: ignore[assignment]
    pair.outbox = _outbox(restarted, pair.signer, pair.hsm, pair.wire,  # type: ignore[arg-type]
                          _pem(pair.hsm.ack_key), retry_s=0.5)  # fmt: skip
    assert pair.outbox.resend_due() == 0  # still backing off, not hammering at start
    time.sleep(0.5)
    assert pair.outbox.resend_due() == 0
    time.sleep(0.6)
    assert pair.outbox.resend_due() == 1
    pair.deliver()
    assert restarted.unacked() == [] and _stored(pair) == 1
    restarted.close()


def test_a_backoff_recorded_before_a_restart_waits_no_longer_than_its_delay_if_the_clock_jumped(
    pair: Pair,
) -> None:
    pair.outbox = _outbox(pair.buffer, pair.signer, pair.hsm, pair.wire,
                          _pem(pair.hsm.ack_key), retry_s=0.3)  # fmt: skip
    pair.add(2)
    pair.outbox.seal()
    (p,) = pair.buffer.unacked()
    pair.buffer.defer(p.batch_id, 0.3, int(time.time() * 1000) + 86_400_000)  # a day ahead
    fresh = _outbox(pair.buffer, pair.signer, pair.hsm, pair.wire,
                    _pem(pair.hsm.ack_key), retry_s=0.3)  # fmt: skip
    assert fresh.resend_due() == 0
    time.sleep(0.35)
    assert fresh.resend_due() == 1
