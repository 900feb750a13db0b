"""One training run: dataset → LoRA → gate → bundle → HSM signature → (publication).

Each step is written to the audit log. The gate judges the exact int8 artifact the
devices will run (merged into the base by ``fleet_model.merge_and_quantize``, the very
function a device runs, and scored with
onnxruntime), on the held-out split of device data and on the golden set frozen at
pretraining (held-out windows of the base dataset, ``golden.npz``): the candidate must
not be worse than production on the split (by ``min_val_gain``) and must not lose more
than ``max_golden_drop`` on the golden set.

The run directory holds: the PEFT adapter (``adapter/``: adapter_config.json +
adapter_model.safetensors), the edge artifact, the merged int8 model used by the
gate, and ``model_card.json`` with provenance. ``runs/latest.json`` points at it.

Sign what was gated (issue 9): the base fp32 is read once and must have the card's
hash; the candidate is merged and scored in memory (``merge_for_gate``); the gate's
audit entry records the hashes it judged (``Gated``); ``check_signable`` refuses to
sign an artifact or a base hash other than those; the OTA repository takes its state
from signed metadata only (``cloud_sidecar.ota_repo``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sidecar import ota_publish
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_hsm
from cloud_sidecar.dataset import build_dataset
from cloud_sidecar.errors import GateRejectedError, RepositoryError, TrainingError
from cloud_sidecar.lora import convert_for_edge, evaluate, train_adapter
from cloud_sidecar.ota_repo import OtaRepository, publish_via_broker
from cloud_sidecar.pretrain import BaseModel, load_base_model, load_reference_sets
from cloud_sidecar.store import Store
from fleet_model import ADAPTER_FORMAT, ModelError, merge_and_quantize
from fleet_protocol.io.files import write_atomic
from fleet_protocol.labels import CLASS_INDEX, CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gated:
    """What the gate judged, by hash: the edge artifact, the int8 model merged from it, and
    the base fp32 it was merged into (the hash the signed metadata names)."""

    artifact_sha256: str
    candidate_int8_sha256: str
    base_fp32_sha256: str


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def merge_for_gate(base: BaseModel, artifact: bytes) -> tuple[bytes, Gated]:
    """The int8 model the devices will run, merged in memory from ``artifact`` and the
    base bytes read once; ``TrainingError`` when the base on disk is not the base the
    card names (pretraining's hash, the one devices check)."""
    base_fp32 = base.onnx_fp32.read_bytes()
    if _sha(base_fp32) != base.sha256_fp32:
        raise TrainingError(
            f"{base.onnx_fp32} does not match the base card's sha256: refusing to gate or sign"
        )
    try:
        merged = merge_and_quantize(base_fp32, artifact, base.calibration.read_bytes())
    except ModelError as exc:
        raise TrainingError(f"adapter does not merge into the base: {exc}") from exc
    return merged.int8, Gated(_sha(artifact), _sha(merged.int8), base.sha256_fp32)


def check_signable(gated: Gated, artifact: bytes, base_model_sha256: str) -> None:
    """Refuse (``RepositoryError``) to sign anything but the exact bytes that were gated."""
    if _sha(artifact) != gated.artifact_sha256:
        raise RepositoryError("the artifact to sign is not the one the gate judged")
    if base_model_sha256 != gated.base_fp32_sha256:
        raise RepositoryError("the base the metadata names is not the one the gate merged into")


def gate(
    production: Path | bytes,
    candidate: Path | bytes,
    val: tuple[Any, Any],
    golden: tuple[Any, Any],
    cfg: SidecarConfig,
) -> dict[str, Any]:
    prod_val, cand_val = evaluate(production, *val), evaluate(candidate, *val)
    prod_gold, cand_gold = evaluate(production, *golden), evaluate(candidate, *golden)
    passed = (
        cand_val["accuracy"] >= prod_val["accuracy"] + cfg.train.min_val_gain
        and cand_gold["accuracy"] >= prod_gold["accuracy"] - cfg.train.max_golden_drop
    )
    return {
        "passed": passed,
        "val_production": prod_val,
        "val_candidate": cand_val,
        "golden_production": prod_gold,
        "golden_candidate": cand_gold,
        "min_val_gain": cfg.train.min_val_gain,
        "max_golden_drop": cfg.train.max_golden_drop,
    }


def run_training(cfg: SidecarConfig, publish: bool = False) -> dict[str, Any]:
    t0 = time.monotonic()
    cfg.check_residency()
    audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
    store = Store(cfg.data_dir / "store.sqlite3", cfg.region)
    base = load_base_model(cfg.base_model_dir)
    run_id = time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir = cfg.data_dir / "runs" / run_id
    try:
        ds = build_dataset(store, cfg.data_dir / "datasets", cfg.train.val_fraction)
        audit.append(
            "dataset.built",
            ds.dataset_id,
            n_train=len(ds.train),
            n_val=len(ds.val),
            manifest=str(ds.manifest_path),
        )
        if len(ds.train) < cfg.train.min_samples or not ds.val:
            raise TrainingError(
                f"dataset {ds.dataset_id[:12]} has {len(ds.train)} train / {len(ds.val)} val samples;"
                f" need at least {cfg.train.min_samples} and a non-empty validation split"
            )
        x_tr = store.features([(s.device_id, s.sample_id) for s in ds.train])
        y_tr = np.array([CLASS_INDEX[s.label] for s in ds.train], dtype=np.int64)
        x_val = store.features([(s.device_id, s.sample_id) for s in ds.val])
        y_val = np.array([CLASS_INDEX[s.label] for s in ds.val], dtype=np.int64)
    finally:
        store.close()
    # The base distribution, frozen at pretraining: replay.npz and golden.npz of the base.
    replay, golden = load_reference_sets(
        base, cfg.train.replay_per_class, cfg.train.golden_per_class
    )

    t_train = time.monotonic()
    adapter_dir = train_adapter(
        base,
        x_tr,
        y_tr,
        replay=replay,
        out_dir=run_dir / "adapter",
        rank=cfg.train.rank,
        epochs=cfg.train.epochs,
        seed=cfg.train.seed,
    )
    train_s = time.monotonic() - t_train
    audit.append(
        "train.finished",
        run_id,
        dataset_id=ds.dataset_id,
        seconds=round(train_s, 1),
        rank=cfg.train.rank,
    )

    # The artifact's bytes stay in memory from here: what is gated is what is signed. The
    # gate scores the int8 bytes merged in memory (the file written beside is a record,
    # never read back), and the signature goes only to the artifact with the gated hash.
    artifact = convert_for_edge(adapter_dir, base)
    edge_adapter = run_dir / "edge-adapter.safetensors"
    write_atomic(edge_adapter, artifact, 0o644)
    candidate_int8, gated = merge_for_gate(base, artifact)
    write_atomic(run_dir / "candidate.int8.onnx", candidate_int8, 0o644)
    decision = gate(base.onnx_int8.read_bytes(), candidate_int8, (x_val, y_val), golden, cfg)
    decision["gated"] = asdict(gated)
    audit.append("gate.decision", run_id, **decision)
    if not decision["passed"]:
        raise GateRejectedError(f"candidate {run_id} did not pass the gate: {json.dumps(decision)}")

    card = {
        "run_id": run_id,
        "dataset_id": ds.dataset_id,
        "dataset_manifest": str(ds.manifest_path),
        "base_model_sha256": base.sha256_fp32,
        "adapter_format": "peft-lora + lora-lowrank-v1 (edge)",
        "rank": cfg.train.rank,
        "epochs": cfg.train.epochs,
        "train_samples": len(ds.train),
        "replay_per_class": cfg.train.replay_per_class,
        "train_seconds": round(train_s, 1),
        "gate": decision,
        "region": cfg.region,
        "classes": list(CLASSES),
    }
    write_atomic(run_dir / "model_card.json", json.dumps(card, indent=1).encode(), 0o644)

    hsm = open_hsm(cfg)
    try:
        check_signable(gated, artifact, base.sha256_fp32)
        repo = OtaRepository(cfg.ota_repo_dir, cfg.ota.channel, hsm.signing_public_key_pem())
        pub = repo.add_adapter(
            artifact,
            base_model_sha256=base.sha256_fp32,
            adapter_version=repo.next_adapter_version(),
            cohort=cfg.ota.cohort,
            expires_days=cfg.ota.expires_days,
            keyid=hsm.signing_key_id(),
            sign_digest=hsm.sign_digest,
        )
        tuf_pub = None
        if ota_publish.tuf_available():  # the TUF repository beside it (docs/adr/0016)
            tuf_pub = ota_publish.add_adapter(
                cfg,
                hsm,
                pub.target.name,
                artifact,
                base_model_sha256=base.sha256_fp32,
                adapter_format=ADAPTER_FORMAT,
                adapter_version=pub.target.adapter_version,
            )
    finally:
        hsm.close()
    audit.append(
        "ota.signed", run_id, version=pub.version, target=pub.target.name, sha256=pub.target.sha256
    )
    if tuf_pub is not None:
        audit.append(
            "ota.tuf_signed",
            run_id,
            targets_version=tuf_pub.targets_version,
            timestamp_version=tuf_pub.timestamp_version,
            target=tuf_pub.name,
        )
    published = False
    if publish:
        published = publish_via_broker(cfg, repo, pub, f"cloud-sidecar-publisher-{run_id}")
        if not published:
            raise TrainingError("the broker did not acknowledge the OTA publication")
        audit.append("ota.published", run_id, version=pub.version, channel=cfg.ota.channel)
        if tuf_pub is not None and not ota_publish.publish_metadata(
            cfg, f"cloud-sidecar-tuf-{run_id}"
        ):
            raise TrainingError("the broker did not acknowledge the TUF metadata publication")
    result = {
        "run_id": run_id,
        "dataset_id": ds.dataset_id,
        "gate": decision,
        "adapter_dir": str(adapter_dir),
        "edge_adapter": str(edge_adapter),
        "edge_adapter_bytes": len(artifact),
        "adapter_peft_bytes": sum(p.stat().st_size for p in adapter_dir.iterdir()),
        "ota_repo_dir": str(cfg.ota_repo_dir),
        "ota_version": pub.version,
        "tuf_repo_dir": str(ota_publish.tuf_repo_dir(cfg)) if tuf_pub is not None else "",
        "published": published,
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_atomic(
        cfg.data_dir / "runs" / "latest.json", json.dumps(result, indent=1).encode(), 0o644
    )
    return result
