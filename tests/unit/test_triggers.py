"""Training triggers (cloud_sidecar.triggers) on a real SQLite store and audit log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar import triggers
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import TriggerConfig
from cloud_sidecar.store import LabelSpan, Store
from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol import batch
from tests.unit.store_keys import memory_data_keys

DAY = triggers.DAY_MS
T0 = 1_764_000_000_000
CFG = TriggerConfig(min_new_labels=10, min_support=10)


def _store(tmp: Path) -> Store:
    s = Store(tmp / "s.sqlite3", "eu", data_keys=memory_data_keys())
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    s.register_device("pi-00", pem)
    return s


def _put(s: Store, seq: int, t0: int, n: int, predicted: str, score: float, reason: str) -> None:
    metas = tuple(
        batch.SampleMeta(
            sample_id=os.urandom(16).hex(), captured_at_ms=t0 + 1000 * i, stream_offset_s=0.0,
            predicted=predicted, score=score, model_sha256="ab" * 32, reason=reason,
        )
        for i in range(n)
    )  # fmt: skip
    feats = np.zeros((n, *FEATURE_SHAPE), np.float16)
    s.put_batch(f"b{seq}", seq, "d", batch.Batch("pi-00", metas, feats))


def test_the_first_evaluation_fires_the_schedule_and_an_attempt_resets_it(tmp_path: Path) -> None:
    s, audit, state = _store(tmp_path), AuditLog(tmp_path / "a.jsonl", "eu"), tmp_path / "t.json"
    assert triggers.evaluate(s, state, CFG, audit, now_ms=T0).fired == ("schedule",)
    triggers.record_attempt(s, state, now_ms=T0)
    assert triggers.evaluate(s, state, CFG, audit, now_ms=T0 + DAY).fired == ()
    assert triggers.evaluate(s, state, CFG, audit, now_ms=T0 + 8 * DAY).fired == ("schedule",)
    entries = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["train.trigger"] * 3


def test_new_labels_and_mispredictions_fire(tmp_path: Path) -> None:
    s, audit, state = _store(tmp_path), AuditLog(tmp_path / "a.jsonl", "eu"), tmp_path / "t.json"
    triggers.record_attempt(s, state, now_ms=T0)
    _put(s, 0, T0 + 1000, 20, "horn", 0.9, "low_confidence")
    s.add_labels([LabelSpan("pi-00", T0, T0 + 100_000, "siren")], "incidents", "i")
    d = triggers.evaluate(s, state, CFG, audit, now_ms=T0 + DAY)
    assert d.fired == ("new_labels", "misprediction")
    assert d.figures["misprediction"] == {"n": 20, "rate": 1.0}


def test_a_shift_in_the_devices_confidence_fires(tmp_path: Path) -> None:
    s, audit, state = _store(tmp_path), AuditLog(tmp_path / "a.jsonl", "eu"), tmp_path / "t.json"
    _put(s, 0, T0 - DAY, 30, "horn", 0.9, "audit")
    triggers.record_attempt(s, state, now_ms=T0)
    _put(s, 1, T0 + 1000, 30, "horn", 0.4, "audit")
    d = triggers.evaluate(s, state, CFG, audit, now_ms=T0 + DAY)
    assert d.fired == ("confidence_shift",)
    assert d.figures["confidence_shift"]["statistic"] == 1.0
