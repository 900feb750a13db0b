"""Data preparation: duplicates, quality filter, the id-hashed split, and the dataset
manifest built from a real SQLite store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar.config import DataConfig
from cloud_sidecar.dataprep import (
    QualityRules,
    exact_duplicates,
    near_duplicates,
    quality_reasons,
    split_of,
)
from cloud_sidecar.dataset import build_dataset, digital_silence_floor
from cloud_sidecar.store import LabelSpan, Store
from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol import batch
from fleet_protocol.features import WINDOW_SAMPLES, features_batch
from tests.unit.store_keys import memory_data_keys

T0 = 1_764_000_000_000
RNG = np.random.default_rng(7)


def _real_windows(n: int, amp: float = 0.05) -> np.ndarray:
    """Features of real (noise) audio windows, in the uploaded representation."""
    audio = (RNG.normal(size=(n, WINDOW_SAMPLES)) * amp).astype(np.float32)
    return features_batch(audio).astype(np.float16).astype(np.float32)


def test_exact_duplicates_keep_the_smallest_key_whatever_the_order() -> None:
    x = _real_windows(3)
    x = np.stack([x[0], x[1], x[0], x[2], x[1]])
    keys = [("b", "2"), ("a", "9"), ("a", "1"), ("c", "0"), ("z", "z")]
    assert exact_duplicates(x, keys).tolist() == [True, False, False, False, True]
    order = [4, 3, 2, 1, 0]
    assert exact_duplicates(x[order], [keys[i] for i in order]).tolist() == [
        True, False, False, False, True
    ]  # fmt: skip


def test_near_duplicates_are_found_transitively_and_distinct_windows_stay() -> None:
    base = _real_windows(4)
    noisy = base[0] + RNG.normal(scale=0.005, size=base[0].shape).astype(np.float32)
    noisier = noisy + RNG.normal(scale=0.005, size=base[0].shape).astype(np.float32)
    x = np.stack([base[0], noisy, noisier, base[1], base[2], base[3]])
    keys = [("d", f"{i}") for i in range(len(x))]
    assert near_duplicates(x, keys, rms=0.02).tolist() == [False, True, True, False, False, False]
    assert not near_duplicates(x, keys, rms=0.0).any()


def test_quality_filter_drops_dead_stuck_and_saturated_inputs_but_keeps_a_quiet_street() -> None:
    floor = digital_silence_floor()
    dead = features_batch(np.zeros((1, WINDOW_SAMPLES), np.float32))[0]
    quiet = _real_windows(1, amp=2e-4)[0]  # the `silence` class: noise above the floor
    stuck = np.repeat(quiet[:, :1], quiet.shape[1], axis=1)
    saturated = np.full(FEATURE_SHAPE, 8.0, np.float32)
    saturated.flat[:10] = 0.0
    nan = quiet.copy()
    nan.flat[3] = np.nan
    got = quality_reasons(np.stack([dead, quiet, stuck, saturated, nan]), QualityRules(floor))
    assert got == ["dead", "", "constant", "saturated", "non_finite"]


def test_the_split_is_80_10_10_by_sample_id_and_never_moves() -> None:
    keys = [(f"pi-{i % 7:02d}", os.urandom(16).hex()) for i in range(20_000)]
    splits = [split_of(k) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.015)
    assert share["val"] == pytest.approx(0.1, abs=0.01)
    assert share["test"] == pytest.approx(0.1, abs=0.01)
    assert [split_of(k) for k in reversed(keys)] == splits[::-1]


def _pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _put(store: Store, device: str, seq: int, feats: np.ndarray, t0: int) -> list[str]:
    ids = [os.urandom(16).hex() for _ in feats]
    metas = tuple(
        batch.SampleMeta(
            sample_id=sid,
            captured_at_ms=t0 + 1000 * i,
            stream_offset_s=0.0,
            predicted="horn",
            score=0.4,
            model_sha256=("ab" if i % 2 else "cd") * 32,
            reason="audit" if i % 3 == 0 else "low_confidence",
        )
        for i, sid in enumerate(ids)
    )
    store.put_batch(f"b-{device}-{seq}", seq, "d" * 64, batch.Batch(device, metas, feats))
    return ids


def test_a_dataset_manifest_records_sources_governance_removals_and_splits(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    store.register_device("pi-00", _pem())
    good = _real_windows(60).astype(np.float16)
    dead = features_batch(np.zeros((2, WINDOW_SAMPLES), np.float32)).astype(np.float16)
    feats = np.concatenate([good, good[:3], dead])  # 3 exact copies, 2 dead windows
    _put(store, "pi-00", 0, feats, T0)
    store.add_labels([LabelSpan("pi-00", T0, T0 + 200_000, "siren")], "incidents", "i-1")
    cfg = DataConfig(controller="City of Example", legal_basis="Art. 6(1)(e)")

    ds = build_dataset(store, tmp_path / "datasets", cfg)
    m = json.loads(ds.manifest_path.read_text())
    assert m["governance"] == {
        "controller": "City of Example",
        "legal_basis": "Art. 6(1)(e)",
        "purpose": cfg.purpose,
    }
    assert m["preparation"]["labelled"] == 65 and m["preparation"]["kept"] == 60
    assert m["preparation"]["exact_duplicates"] == 3
    assert m["preparation"]["quality_removed"] == {"dead": 2}
    assert m["sources"]["devices"]["pi-00"] == {
        "samples": 65, "batches": 1, "first_ms": T0, "last_ms": T0 + 64_000
    }  # fmt: skip
    assert set(m["sources"]["edge_models"]) == {"ab" * 32, "cd" * 32}
    assert set(m["sources"]["selection_reasons"]) == {"audit", "low_confidence"}
    assert sum(m["split"]["counts"].values()) == 60
    assert len(ds.train) + len(ds.val) + len(ds.test) == 60
    assert ds.splits["train"].features.shape == (len(ds.train), *FEATURE_SHAPE)

    # same data, same id; more data never moves a sample between splits
    again = build_dataset(store, tmp_path / "datasets", cfg)
    assert again.dataset_id == ds.dataset_id
    _put(store, "pi-00", 1, _real_windows(20).astype(np.float16), T0 + 100_000)
    grown = build_dataset(store, tmp_path / "datasets", cfg)
    assert grown.dataset_id != ds.dataset_id
    for name in ("train", "val", "test"):
        before = {s.sample_id for s in ds.splits[name].samples}
        assert before <= {s.sample_id for s in grown.splits[name].samples}
    store.close()
