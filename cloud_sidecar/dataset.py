"""Datasets: a reproducible, audited manifest of which stored samples train and which judge.

Only samples a label from the label channel covers are used (``Store.labelled_samples``
joins labels to samples by device and capture time); unlabelled samples stay stored. The split is a function of
each sample's identity (SHA-256 of device and sample id), so adding samples never
moves an existing sample between train and validation. The dataset id is the SHA-256
of the canonical manifest body: the same samples and labels give the same id.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cloud_sidecar.store import LabelledSample, Store


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    manifest_path: Path
    train: tuple[LabelledSample, ...]
    val: tuple[LabelledSample, ...]


def _bucket(s: LabelledSample) -> float:
    h = hashlib.sha256(f"{s.device_id}/{s.sample_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def build_dataset(store: Store, out_dir: Path, val_fraction: float) -> Dataset:
    samples = store.labelled_samples()
    train = tuple(s for s in samples if _bucket(s) >= val_fraction)
    val = tuple(s for s in samples if _bucket(s) < val_fraction)
    body = {
        "train": [[s.device_id, s.sample_id, s.label] for s in train],
        "val": [[s.device_id, s.sample_id, s.label] for s in val],
    }
    dataset_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    manifest = {
        "dataset_id": dataset_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": store.region,
        "label_sources": dict(Counter(s.source for s in samples)),
        "n_train": len(train),
        "n_val": len(val),
        "labels_train": dict(Counter(s.label for s in train)),
        "labels_val": dict(Counter(s.label for s in val)),
        "devices": dict(Counter(s.device_id for s in samples)),
        **body,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dataset-{dataset_id[:16]}.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return Dataset(dataset_id, path, train, val)
