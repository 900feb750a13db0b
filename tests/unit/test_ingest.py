"""Ingest decisions with in-memory software keys (the SoftHSM/TPM path is in tests/integration).

Every rejection: stores nothing, is counted by reason, is audited, is acknowledged as
rejected, and the next good upload from another device is still stored.
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
from cloud_sidecar.ingest import Ingest
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from fleet_protocol import batch, envelope, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.messages import Ack

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _pem(k: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class FakeHsm:
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def unwrap_key_id(self) -> str:
        return key_id_from_pem(_pem(self.key))

    def decrypt_oaep(self, wrapped: bytes) -> bytes:
        return self.key.decrypt(wrapped, OAEP)


@dataclass
class FakeDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    seq: int = 0

    def upload(
        self, hsm: FakeHsm, n: int = 2, seq: int | None = None, device_in_header: str | None = None
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
                np.zeros((n, N_BANDS, N_FRAMES), np.float16),
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
    store = Store(tmp_path / "store.sqlite3", "eu-central-1")
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    metrics, hsm = Metrics(), FakeHsm()
    acks: list[tuple[str, Ack]] = []
    ingest = Ingest(
        store, hsm, audit, metrics, lambda t, p: acks.append((t, Ack.from_bytes(p))), 1024 * 1024
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


def test_old_sequence_number_is_a_replay(world: World) -> None:
    world.ingest.handle(topics.upload("pi-00"), world.a.upload(world.hsm, seq=5))
    _assert_rejected_and_still_serving(world, world.a.upload(world.hsm, seq=5), "replay")


def test_upload_for_another_unwrap_key_is_rejected(world: World) -> None:
    _assert_rejected_and_still_serving(world, world.a.upload(FakeHsm()), "unknown_key")


def test_oversized_upload_is_rejected(world: World) -> None:
    _assert_rejected_and_still_serving(world, b"SEV1" + b"\0" * (1024 * 1024), "too_large")


def test_garbage_is_rejected(world: World) -> None:
    _assert_rejected_and_still_serving(world, b"not an envelope", "malformed")
