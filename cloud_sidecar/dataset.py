"""Datasets: a reproducible, audited collection manifest of which stored samples train,
which validate and which are kept for the final test report.

Building one: the labelled samples (``TrainingData.labelled_samples``: labels from the
label channel joined to samples by device and capture time; unlabelled samples stay
stored, unused) → exact duplicates (content hash) out → near-duplicates out
(``dataprep.near_duplicates``) → quality filter (``dataprep.quality_reasons``) → split
80/10/10 by a hash of each sample id (``dataprep.split_of``).

Invariants:
- the manifest records where the data came from (devices, batches, capture time range,
  label sources, the edge model versions that selected each window, why each was kept),
  the legal basis and purpose from config, and every removal with its reason and count;
  its SHA-256 (of the file's bytes) is what the audit log and the model card name;
- the dataset id is the SHA-256 of the canonical body (every kept sample's key, label,
  content hash and split): the same data gives the same id, whatever the build time;
- a sample never changes split between dataset versions (its split is a function of
  its id); the test split is read only by the final report, never by the gate.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_sidecar.config import DataConfig
from cloud_sidecar.dataprep import (
    SPLITS,
    QualityRules,
    exact_duplicates,
    near_duplicates,
    quality_reasons,
    split_of,
    window_hash,
)
from cloud_sidecar.residual_scan import SpeechScanner
from cloud_sidecar.store import LabelledSample
from cloud_sidecar.store_api import FEATURE_SHAPE, TrainingData
from fleet_protocol.features import WINDOW_SAMPLES, features_batch
from fleet_protocol.io.files import write_atomic

MANIFEST_VERSION = 2


@lru_cache(maxsize=1)
def digital_silence_floor() -> float:
    """The feature extractor's value on all-zero audio (the quality filter's floor)."""
    return float(np.median(features_batch(np.zeros((1, WINDOW_SAMPLES), np.float32))))


@dataclass(frozen=True)
class Split:
    samples: tuple[LabelledSample, ...]
    features: npt.NDArray[np.float32] = field(repr=False)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    manifest_path: Path
    manifest_sha256: str
    splits: dict[str, Split]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def train(self) -> tuple[LabelledSample, ...]:
        return self.splits["train"].samples

    @property
    def val(self) -> tuple[LabelledSample, ...]:
        return self.splits["val"].samples

    @property
    def test(self) -> tuple[LabelledSample, ...]:
        return self.splits["test"].samples


def _sources(samples: list[LabelledSample]) -> dict[str, Any]:
    per_device: dict[str, dict[str, Any]] = {}
    batches: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        d = per_device.setdefault(
            s.device_id, {"samples": 0, "first_ms": s.captured_at_ms, "last_ms": s.captured_at_ms}
        )
        d["samples"] += 1
        d["first_ms"] = min(d["first_ms"], s.captured_at_ms)
        d["last_ms"] = max(d["last_ms"], s.captured_at_ms)
        batches[s.device_id].add(s.batch_id)
    for dev, d in per_device.items():
        d["batches"] = len(batches[dev])
    return {
        "devices": dict(sorted(per_device.items())),
        "label_sources": dict(Counter(s.source for s in samples)),
        "edge_models": dict(Counter(s.model_sha256 for s in samples)),
        "selection_reasons": dict(Counter(s.reason for s in samples)),
    }


def build_dataset(
    store: TrainingData, out_dir: Path, cfg: DataConfig, scanner: SpeechScanner | None = None
) -> Dataset:
    """Build, write and return the dataset of everything labelled in ``store`` now.

    With ``scanner``, windows it flags as speech are left out (``residual_speech``) and
    listed in ``manifest["preparation"]["residual_speech"]``; deleting them from the store
    and halting over the threshold is the caller's (``train``), which audits both.
    """
    samples = store.labelled_samples()
    keys = [(s.device_id, s.sample_id) for s in samples]
    x = store.features(keys) if samples else np.empty((0, *FEATURE_SHAPE), np.float32)
    removed: dict[tuple[str, str], str] = {}
    residual: dict[str, Any] = {"scanned": 0, "flagged": 0, "rate": 0.0, "scanner": None}
    if scanner is not None and samples:
        flags = scanner.flags(x)
        for k, flagged in zip(keys, flags, strict=True):
            if flagged:
                removed[k] = "residual_speech"
        residual = {
            "scanned": len(keys),
            "flagged": int(flags.sum()),
            "rate": round(float(flags.mean()), 6),
            "scanner": scanner.feature_version,
        }

    quality = quality_reasons(
        x,
        QualityRules(
            floor=digital_silence_floor(),
            constant_std=cfg.constant_std,
            saturated_share=cfg.saturated_share,
        ),
    )
    for k, why in zip(keys, quality, strict=True):
        if why and k not in removed:
            removed[k] = f"quality:{why}"
    ok = [i for i, k in enumerate(keys) if k not in removed]
    exact = exact_duplicates(x[ok], [keys[i] for i in ok])
    for j in np.flatnonzero(exact):
        removed[keys[ok[j]]] = "exact_duplicate"
    ok = [i for i in ok if keys[i] not in removed]
    near = near_duplicates(x[ok], [keys[i] for i in ok], cfg.near_duplicate_rms)
    for j in np.flatnonzero(near):
        removed[keys[ok[j]]] = "near_duplicate"
    kept = [i for i in ok if keys[i] not in removed]

    by_split: dict[str, list[int]] = {name: [] for name in SPLITS}
    hashes: dict[int, str] = {}
    for i in kept:
        by_split[split_of(keys[i], cfg.split)].append(i)
        hashes[i] = window_hash(x[i])
    body = {
        name: [
            [samples[i].device_id, samples[i].sample_id, samples[i].label, hashes[i]] for i in idx
        ]
        for name, idx in by_split.items()
    }
    dataset_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    reasons = Counter(removed.values())
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "dataset_id": dataset_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": store.region,
        "governance": {
            "controller": cfg.controller,
            "legal_basis": cfg.legal_basis,
            "purpose": cfg.purpose,
        },
        "feature_shape": list(FEATURE_SHAPE),
        "sources": _sources(samples),
        "preparation": {
            "labelled": len(samples),
            "quality_removed": {
                r.split(":", 1)[1]: n for r, n in reasons.items() if r.startswith("quality:")
            },
            "exact_duplicates": reasons.get("exact_duplicate", 0),
            "near_duplicates": reasons.get("near_duplicate", 0),
            "near_duplicate_rms": cfg.near_duplicate_rms,
            "residual_speech": residual,
            "kept": len(kept),
        },
        "split": {
            "fractions": list(cfg.split),
            "by": "sha256(device/sample_id)",
            "counts": {n: len(idx) for n, idx in by_split.items()},
            "labels": {
                n: dict(Counter(samples[i].label for i in idx)) for n, idx in by_split.items()
            },
            "devices": {
                n: dict(Counter(samples[i].device_id for i in idx)) for n, idx in by_split.items()
            },
        },
        "removed": sorted([*k, why] for k, why in removed.items()),
        **body,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = out_dir / f"dataset-{dataset_id[:16]}.json"
    write_atomic(path, data, 0o640)
    splits = {
        n: Split(tuple(samples[i] for i in idx), x[idx] if idx else x[:0])
        for n, idx in by_split.items()
    }
    return Dataset(dataset_id, path, hashlib.sha256(data).hexdigest(), splits, manifest)
