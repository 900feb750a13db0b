"""The residual speech scan: trained on espeak-ng speech over city beds and on city
sounds (devstack), measured on a fresh set, and run by the dataset build on a real
SQLite store: flagged windows are deleted and audited, and the build halts over 0.1 %."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import DataConfig, SidecarConfig
from cloud_sidecar.dataset import build_dataset
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.residual_scan import load_scanner
from cloud_sidecar.store import LabelSpan, Store
from cloud_sidecar.train import _quarantine
from devstack.speech_scan import feature_sets, measure, train_scanner
from fleet_protocol import batch
from tests.unit.store_keys import memory_data_keys

T0 = 1_764_000_000_000


@pytest.fixture(scope="module")
def scanner_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scanner.npz"
    train_scanner(path, n=200, seed=7)
    return path


def test_the_scanner_finds_speech_windows_and_spares_city_sounds(scanner_path: Path) -> None:
    figures = measure(load_scanner(scanner_path), n=100, seed=2024)
    assert figures["recall"] >= 0.85
    assert figures["false_flag"] <= 0.05


def test_flagged_windows_are_deleted_audited_and_the_build_halts(
    scanner_path: Path, tmp_path: Path
) -> None:
    speech, city = feature_sets(40, seed=99)
    x = np.concatenate([city, speech[:5]]).astype(np.float16)
    store = Store(tmp_path / "s.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    store.register_device("pi-00", pem)
    metas = tuple(
        batch.SampleMeta(
            sample_id=os.urandom(16).hex(), captured_at_ms=T0 + 1000 * i, stream_offset_s=0.0,
            predicted="horn", score=0.4, model_sha256="ab" * 32, reason="audit",
        )
        for i in range(len(x))
    )  # fmt: skip
    store.put_batch("b0", 0, "d", batch.Batch("pi-00", metas, x))
    store.add_labels([LabelSpan("pi-00", T0, T0 + 100_000, "traffic")], "incidents", "i")
    scanner = load_scanner(scanner_path)
    ds = build_dataset(store, tmp_path / "ds", DataConfig(), scanner)
    residual = ds.manifest["preparation"]["residual_speech"]
    assert residual["scanned"] == 45 and residual["flagged"] >= 4
    cfg = SidecarConfig.model_validate(
        {
            "data_dir": tmp_path, "region": "eu-central-1", "base_model_dir": tmp_path,
            "broker": {"ca_cert": "x", "client_cert": "x", "client_key": "x",
                       "region": "on-prem-de"},
            "hsm": {"module": "x", "token_label": "t", "region": "on-prem-de"},
        }
    )  # fmt: skip
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    with pytest.raises(TrainingError, match="residual speech scan flagged"):
        _quarantine(store, ds, cfg, audit, "run-x")
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["residual.deleted", "train.refused"]
    assert entries[0]["details"]["deleted"] == residual["flagged"]
    assert store.counts()["samples"] == 45 - residual["flagged"]
    store.close()
