"""Ingest decisions with in-memory software keys (the SoftHSM/TPM path is in tests/integration).

Every rejection: stores nothing, is counted by reason, is audited, is acknowledged as
rejected, and the next good upload from another device is still stored. Every deferral
(transient) stores nothing and is acknowledged ``retry``. Every ack is signed by the
ack key and names the digest of the envelope it is about (docs/adr/0017).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cloud_sidecar.audit import AuditLog, verify
from cloud_sidecar.errors import HsmDecryptError
from cloud_sidecar.ingest import Ingest
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.residual_scan import SpeechScanner, summary
from cloud_sidecar.store import Store
from fleet_protocol import batch, envelope, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.messages import Ack
from tests.unit.store_keys import memory_data_keys

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _pem(k: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class FakeHsm:
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    retired: list[rsa.RSAPrivateKey] = field(default_factory=list)
    ack_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    fail_transiently: int = 0  # the next n unwraps raise CKR_GENERAL_ERROR-like errors

    def unwrap_key_id(self) -> str:
        return key_id_from_pem(_pem(self.key))

    def unwrap_key_ids(self) -> tuple[str, ...]:
        return tuple(key_id_from_pem(_pem(k)) for k in (self.key, *self.retired))

    def decrypt_oaep(self, wrapped: bytes, key_id: str) -> bytes:
        if self.fail_transiently:
            self.fail_transiently -= 1
            raise HsmDecryptError("CKR_GENERAL_ERROR", transient=True)
        for k in (self.key, *self.retired):
            if key_id_from_pem(_pem(k)) == key_id:
                return k.decrypt(wrapped, OAEP)
        raise AssertionError("ingest asked for a key it was not told about")

    def rotate(self) -> None:
        self.retired.append(self.key)
        self.key = rsa.generate_private_key(65537, 2048)

    def ack_key_id(self) -> str:
        return key_id_from_pem(_pem(self.ack_key))

    def sign_ack_digest(self, digest: bytes) -> bytes:
        return self.ack_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@dataclass
class FakeDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    seq: int = 0

    epoch: int = 1

    def upload(
        self,
        hsm: FakeHsm,
        n: int = 2,
        seq: int | None = None,
        device_in_header: str | None = None,
        features: np.ndarray | None = None,
    ) -> bytes:
        metas = tuple(
            batch.SampleMeta(
                sample_id=os.urandom(16).hex(),
                captured_at_ms=1,
                stream_offset_s=float(i),
                predicted="horn",
                score=0.4,
                model_sha256="ab" * 32,
                reason="low_confidence",
            )
            for i in range(n)
        )
        plain = batch.encode(
            batch.Batch(
                device_in_header or self.device_id,
                metas,
                np.zeros((n, N_BANDS, N_FRAMES), np.float16) if features is None else features,
            )
        )
        s = self.seq if seq is None else seq
        self.seq = s + 1
        return envelope.seal(
            plain,
            device=device_in_header or self.device_id,
            batch_id=os.urandom(16).hex(),
            seq=s,
            created_at_ms=1,
            wrap_public_key_pem=_pem(hsm.key),
            kid_wrap=hsm.unwrap_key_id(),
            kid_sig=key_id_from_pem(_pem(self.key)),
            sign_digest=lambda d: self.key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
            epoch=self.epoch,
        )


@dataclass
class World:
    ingest: Ingest
    store: Store
    audit: AuditLog
    metrics: Metrics
    hsm: FakeHsm
    a: FakeDevice
    b: FakeDevice
    acks: list[tuple[str, Ack]]


@pytest.fixture
def world(tmp_path: Path) -> World:
    store = Store(tmp_path / "store.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    metrics, hsm = Metrics(), FakeHsm()
    acks: list[tuple[str, Ack]] = []
    ingest = Ingest(
        store,
        hsm,
        audit,
        metrics,
        lambda t, p: acks.append((t, Ack.from_bytes(p))),
        1024 * 1024,
        signer=hsm,
    )
    a, b = FakeDevice("pi-00"), FakeDevice("pi-01")
    for d in (a, b):
        store.register_device(d.device_id, _pem(d.key))
    return World(ingest, store, audit, metrics, hsm, a, b, acks)


def _assert_rejected_and_still_serving(
    w: World, payload: bytes, reason: str, topic: str | None = None
) -> None:
    before = w.store.counts()["samples"]
    result = w.ingest.handle(topic or topics.upload(w.a.device_id), payload)
    assert result.status == "rejected" and result.reason == reason
    assert w.store.counts()["samples"] == before
    assert w.metrics.get("ingest_rejected_total", reason=reason) == 1
    assert '"ingest.rejected"' in w.audit.path.read_text().splitlines()[-1]
    assert verify(w.audit.path) >= 1
    ok = w.ingest.handle(topics.upload(w.b.device_id), w.b.upload(w.hsm))
    assert ok.status == "stored"


def test_valid_upload_is_stored_acked_and_audited(world: World) -> None:
    r = world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, n=3))
    assert (r.status, r.n_samples) == ("stored", 3)
    assert world.store.counts()["samples"] == 3
    topic, ack = world.acks[-1]
    assert topic == topics.ack("pi-00") and ack.status == "stored"
    assert verify(world.audit.path) == 2
    kinds = [json.loads(line)["kind"] for line in world.audit.path.read_text().splitlines()]
    assert kinds == ["hsm.unwrap", "ingest.stored"]


def test_retransmitted_batch_is_acked_again_but_stored_once(world: World) -> None:
    payload = world.a.upload(world.hsm)
    world.ingest.handle(topics.upload("pi-00"), payload)
    r = world.ingest.handle(topics.upload("pi-00"), payload)
    assert r.status == "duplicate"
    assert world.store.counts()["samples"] == 2
    assert world.acks[-1][1].status == "stored"


def test_tampered_ciphertext_is_rejected(world: World) -> None:
    p = bytearray(world.a.upload(world.hsm))
    p[-5] ^= 1
    _assert_rejected_and_still_serving(world, bytes(p), "bad_signature")


def test_upload_signed_by_another_key_is_rejected(world: World) -> None:
    forger = FakeDevice("pi-00")
    _assert_rejected_and_still_serving(world, forger.upload(world.hsm), "unknown_key")


def test_unknown_device_is_rejected(world: World) -> None:
    stranger = FakeDevice("pi-99")
    _assert_rejected_and_still_serving(
        world, stranger.upload(world.hsm), "unknown_device", topics.upload("pi-99")
    )


def test_disabled_device_is_rejected(world: World) -> None:
    world.store.set_device_status("pi-00", "disabled")
    _assert_rejected_and_still_serving(world, world.a.upload(world.hsm), "revoked_device")


def test_header_naming_another_device_is_rejected(world: World) -> None:
    p = world.a.upload(world.hsm, device_in_header="pi-01")
    _assert_rejected_and_still_serving(world, p, "device_mismatch")


def test_reused_sequence_number_under_another_batch_id_is_a_replay(world: World) -> None:
    world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=5))
    _assert_rejected_and_still_serving(world, world.a.upload(world.hsm, seq=5), "replay")


def test_oversized_upload_is_rejected(world: World) -> None:
    _assert_rejected_and_still_serving(world, b"SEV1" + b"\0" * (1024 * 1024), "too_large")


def test_garbage_is_rejected(world: World) -> None:
    _assert_rejected_and_still_serving(world, b"not an envelope", "malformed")


# -- out of order, epochs, replay window (docs/adr/0017) ---------------------------------


def _stored(w: World) -> int:
    return w.store.counts()["batches"]


def test_batches_arriving_out_of_order_are_all_stored_exactly_once(world: World) -> None:
    late, early = world.a.upload(world.hsm, seq=5), world.a.upload(world.hsm, seq=6)
    statuses = [world.ingest.handle(topics.upload("pi-00"), p).status for p in (early, late)]
    assert statuses == ["stored", "stored"]
    again = [world.ingest.handle(topics.upload("pi-00"), p).status for p in (late, early)]
    assert again == ["duplicate", "duplicate"]
    assert _stored(world) == 2 and [a.status for _, a in world.acks] == ["stored"] * 4


def test_wiped_device_starts_a_new_epoch_from_sequence_0(world: World) -> None:
    for seq in range(3):
        world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=seq))
    world.a.epoch = 2  # state wiped: a new buffer draws a new epoch and counts from 0
    r = world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=0))
    assert r.status == "stored" and _stored(world) == 4


def test_sequence_below_the_window_is_refused_as_stale(world: World) -> None:
    world.store.replay_window = 4
    world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=10))
    assert world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=7)).status == (
        "stored"
    )
    _assert_rejected_and_still_serving(world, world.a.upload(world.hsm, seq=6), "stale_seq")
    assert world.acks[-2][1].status == "rejected"


# -- transient refusals: the device keeps the batch --------------------------------------


def _assert_deferred(w: World, payload: bytes, reason: str) -> None:
    before = _stored(w)
    r = w.ingest.handle(topics.upload(w.a.device_id), payload)
    assert (r.status, r.reason) == ("deferred", reason)
    assert _stored(w) == before
    assert w.acks[-1][1].status == "retry" and w.acks[-1][1].reason == reason
    assert w.metrics.get("ingest_deferred_total", reason=reason) == 1
    assert '"ingest.deferred"' in w.audit.path.read_text()
    r = w.ingest.handle(topics.upload(w.a.device_id), payload)  # the device's resend
    assert r.status == "stored" and _stored(w) == before + 1


def test_upload_for_an_unwrap_key_not_held_is_deferred_not_rejected(world: World) -> None:
    future = FakeHsm()
    payload = world.a.upload(future)  # sealed for a key the sidecar gets later
    r = world.ingest.handle(topics.upload("pi-00"), payload)
    assert (r.status, r.reason) == ("deferred", "unknown_unwrap_key")
    assert world.acks[-1][1].status == "retry" and _stored(world) == 0
    world.hsm.retired.append(future.key)  # the key is restored to the token
    assert world.ingest.handle(topics.upload("pi-00"), payload).status == "stored"


def test_batches_sealed_for_the_old_and_the_new_unwrap_key_both_open(world: World) -> None:
    old = world.a.upload(world.hsm)
    world.hsm.rotate()
    new = world.a.upload(world.hsm)
    statuses = [world.ingest.handle(topics.upload("pi-00"), p).status for p in (new, old)]
    assert statuses == ["stored", "stored"]


def test_token_error_during_unwrap_is_deferred(world: World) -> None:
    world.hsm.fail_transiently = 1
    _assert_deferred(world, world.a.upload(world.hsm), "hsm_error")


def test_full_cloud_disk_is_deferred_and_the_resend_is_stored(world: World) -> None:
    db = world.store._db  # SQLite's own SQLITE_FULL: cap the file at its current size
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count={pages}")
    payload = world.a.upload(world.hsm, n=40)
    r = world.ingest.handle(topics.upload("pi-00"), payload)
    assert (r.status, r.reason) == ("deferred", "store_unavailable")
    assert world.acks[-1][1].status == "retry" and _stored(world) == 0
    db.execute("PRAGMA max_page_count=1073741823")
    assert world.ingest.handle(topics.upload("pi-00"), payload).status == "stored"


# -- signed acks --------------------------------------------------------------------------


def test_every_ack_is_signed_by_the_ack_key_and_names_the_envelope_digest(world: World) -> None:
    import hashlib

    good = world.a.upload(world.hsm)
    world.ingest.handle(topics.upload("pi-00"), good)
    world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=0))  # replay
    for payload, (_, ack) in zip((good, None), world.acks, strict=True):
        ack.verify(_pem(world.hsm.ack_key))
        assert ack.kid == world.hsm.ack_key_id()
        if payload is not None:
            assert ack.digest == hashlib.sha256(payload).hexdigest()


def _loud_scanner() -> SpeechScanner:
    """A scanner that flags loud windows (all-ones features) and passes quiet ones (zeros)."""
    quiet = summary(np.zeros((1, N_BANDS, N_FRAMES), np.float32))[0]
    loud = summary(np.ones((1, N_BANDS, N_FRAMES), np.float32))[0]
    w = loud - quiet
    return SpeechScanner(w, -float(w @ (loud + quiet) / 2), np.zeros_like(w), np.ones_like(w), 0.5)


def test_windows_the_residual_scan_flags_are_never_stored_counted_and_audited(
    world: World,
) -> None:
    world.ingest.scanner = _loud_scanner()
    feats = np.zeros((4, N_BANDS, N_FRAMES), np.float16)
    feats[[1, 3]] = 1.0
    r = world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, 4, features=feats))
    assert (r.status, r.n_samples) == ("stored", 2)
    assert world.store.counts()["samples"] == 2
    assert world.metrics.get("ingest_residual_speech_total", device="pi-00") == 2
    entries = [json.loads(line) for line in world.audit.path.read_text().splitlines()]
    scan = [e for e in entries if e["kind"] == "ingest.residual_speech"]
    assert len(scan) == 1 and scan[0]["details"]["quarantined"] == 2
    assert all(s["score"] >= 0.5 for s in scan[0]["details"]["samples"])
    assert world.acks[-1][1].status == "stored"  # the device deletes its copy as well


def test_a_batch_of_only_flagged_windows_stores_none_and_is_still_acked_once(
    world: World,
) -> None:
    world.ingest.scanner = _loud_scanner()
    payload = world.a.upload(world.hsm, 3, features=np.ones((3, N_BANDS, N_FRAMES), np.float16))
    r = world.ingest.handle(topics.upload("pi-00"), payload)
    assert (r.status, r.n_samples) == ("stored", 0)
    assert world.store.counts()["samples"] == 0
    assert world.ingest.handle(topics.upload("pi-00"), payload).status == "duplicate"
    assert world.metrics.get("ingest_residual_speech_total", device="pi-00") == 3
