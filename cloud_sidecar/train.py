"""One training run: dataset → LoRA → gate against production → signed bundle → registry.

Training never publishes: a bundle that passed the gate is registered as ``candidate``;
``cloud-sidecar release approve`` (a named approver) and ``release publish`` (OTA)
are separate steps (``cloud_sidecar/release.py``, docs/adr/0020).

Each step is written to the audit log: the dataset (its manifest's SHA-256), a refusal
(empty or single-class dataset, too few samples, non-finite weights) with its reason,
the gate's decision, the registered bundle. The gate (``cloud_sidecar.gate``) judges
the exact int8 artifact the devices will run (merged into the base by
``fleet_model.merge_and_quantize``, the very function a device runs) against the model
the devices run now. The test split is scored only for the model card's report.

The run directory (``data_dir/runs/<run_id>``) holds the working files; the bundle in
``data_dir/registry/versions/<version>`` holds: ``adapter/`` (PEFT: adapter_config.json
+ adapter_model.safetensors), ``edge-adapter.safetensors``, ``candidate.int8.onnx``,
``gate.json``, ``dataset.json``, ``model_card.json`` + ``model_card.md``,
``sbom.cdx.json`` (CycloneDX: the training environment), ``bundle.json`` and
``bundle.sig`` (HSM over ``bundle.json``, so over every file). ``runs/latest.json``
points at it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sidecar.adapter_fit import training_device
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_hsm
from cloud_sidecar.dataset import Dataset, build_dataset
from cloud_sidecar.errors import (
    GateRejectedError,
    RepositoryError,
    StoreError,
    TrainingError,
)
from cloud_sidecar.finetune import LEARNING_RATES
from cloud_sidecar.gate import judge, median_latency_ms, membership_auc, score
from cloud_sidecar.lora import PEFT_WEIGHTS, convert_for_edge, fine_tune
from cloud_sidecar.model import ADAPTABLE_LAYERS
from cloud_sidecar.pretrain import TRAIN_THREADS, BaseModel, load_base_model, load_reference_sets
from cloud_sidecar.registry import (
    BUNDLE_INDEX,
    BUNDLE_SIG,
    GOLDEN_CLIPS,
    GOLDEN_CLIPS_META,
    Registry,
    bundle_index,
)
from cloud_sidecar.residual_scan import load_scanner
from cloud_sidecar.sbom import SBOM_FILE, write_sbom
from cloud_sidecar.store_api import TrainingData, open_store
from cloud_sidecar.train_metrics import ProgressMonitor, TrainProgress, textfile_path, tracked
from fleet_model import ModelError, merge_and_quantize
from fleet_model.golden import encode_golden, parse_golden
from fleet_protocol.io.files import file_sha256, write_atomic
from fleet_protocol.labels import CLASS_INDEX, CLASSES

log = logging.getLogger(__name__)

GOLDEN_CLIPS_PER_CLASS = 4  # shipped with the adapter; the device's shadow check runs them


def golden_clips(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``GOLDEN_CLIPS_PER_CLASS`` golden windows of each class, in class order."""
    keep = np.concatenate(
        [np.flatnonzero(y == c)[:GOLDEN_CLIPS_PER_CLASS] for c in sorted(set(y.tolist()))]
    )
    return x[keep], y[keep]


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


class RunMonitor:
    """Training metrics to the log and ``metrics.jsonl``; alerts also to the audit log."""

    def __init__(self, audit: AuditLog, run_id: str, path: Path) -> None:
        self.audit, self.run_id, self.path = audit, run_id, path
        path.parent.mkdir(parents=True, exist_ok=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        log.info("train %s step %d: %s", self.run_id, step, values)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def alert(self, kind: str, details: dict[str, Any]) -> None:
        log.warning("train %s alert %s: %s", self.run_id, kind, details)
        with open(self.path, "a") as f:
            f.write(json.dumps({"alert": kind, **details}) + "\n")
        self.audit.append("train.alert", self.run_id, alert=kind, **details)


def _refuse(audit: AuditLog, run_id: str, reason: str, message: str) -> TrainingError:
    audit.append("train.refused", run_id, reason=reason, detail=message[:300])
    return TrainingError(message)


def _labels(ds: Dataset, split: str) -> np.ndarray:
    return np.array([CLASS_INDEX[s.label] for s in ds.splits[split].samples], dtype=np.int64)


def production_model(registry: Registry, base: BaseModel) -> tuple[str, Path]:
    """(version, int8 model) the devices run now: the registry's production alias, else
    the base model (version "base")."""
    version = registry.alias("production")
    if version is None:
        return "base", base.onnx_int8
    return version, registry.bundle_dir(version) / "candidate.int8.onnx"


def _quarantine(
    store: TrainingData, ds: Dataset, cfg: SidecarConfig, audit: AuditLog, run_id: str
) -> None:
    """Delete the windows the residual speech scan flagged; halt over the threshold."""
    residual = ds.manifest["preparation"]["residual_speech"]
    flagged = [(d, s) for d, s, why in ds.manifest["removed"] if why == "residual_speech"]
    if flagged:
        deleted = store.delete_samples(flagged)
        audit.append(
            "residual.deleted", ds.dataset_id, deleted=deleted, scanned=residual["scanned"],
            rate=residual["rate"],
        )  # fmt: skip
    if residual["rate"] > cfg.data.max_residual_speech_rate:
        raise _refuse(
            audit,
            run_id,
            "residual_speech",
            f"the residual speech scan flagged {residual['flagged']} of {residual['scanned']}"
            f" windows ({residual['rate']:.4%} > {cfg.data.max_residual_speech_rate:.2%}):"
            " they were deleted; find why the devices' gate let speech through before training",
        )


def _check_dataset(ds: Dataset, cfg: SidecarConfig, audit: AuditLog, run_id: str) -> None:
    n = {name: len(split) for name, split in ds.splits.items()}
    if sum(n.values()) == 0:
        raise _refuse(audit, run_id, "empty", f"dataset {ds.dataset_id[:12]} holds no samples")
    classes = {s.label for s in ds.train}
    if len(classes) < 2:
        raise _refuse(
            audit,
            run_id,
            "single_class",
            f"dataset {ds.dataset_id[:12]} trains on {len(classes)} class(es) {sorted(classes)};"
            " an adapter needs at least two",
        )
    if n["train"] < cfg.train.min_samples or n["val"] == 0:
        raise _refuse(
            audit,
            run_id,
            "too_few_samples",
            f"dataset {ds.dataset_id[:12]} has {n['train']} train / {n['val']} val samples;"
            f" need at least {cfg.train.min_samples} and a non-empty validation split",
        )


def _check_finite(adapter_dir: Path, audit: AuditLog, run_id: str) -> None:
    from safetensors.numpy import load_file

    bad = [
        k for k, v in load_file(str(adapter_dir / PEFT_WEIGHTS)).items() if not np.isfinite(v).all()
    ]
    if bad:
        raise _refuse(
            audit, run_id, "non_finite", f"training diverged (NaN/inf loss): {len(bad)} tensors"
        )


def _model_card_md(card: dict[str, Any]) -> str:
    g, hp = card["evaluation"]["gate"], card["hyperparameters"]
    lines = [
        f"# Adapter {card['version']}",
        "",
        f"- base model: `{card['lineage']['base_sha256'][:16]}`; parent: {card['lineage']['parent']}",
        f"- dataset: `{card['lineage']['dataset_id'][:16]}` (manifest sha256"
        f" `{card['data']['manifest_sha256'][:16]}`), {card['data']['n']}",
        f"- legal basis: {card['data']['governance']['legal_basis']};"
        f" purpose: {card['data']['governance']['purpose']}",
        f"- method: {hp['method']}, rank {hp['rank']} on {', '.join(hp['targets'])}"
        f" (per layer {hp['ranks']}),"
        f" {hp['trainable_parameters']} of {hp['total_parameters']} parameters trained,"
        f" {hp['epochs']} epochs, lr {hp['learning_rate']}, seed {hp['seed']}",
        f"- QLoRA: {hp.get('qlora', 'n/a')}",
        f"- compute: {card['compute']['train_seconds']} s on {card['compute']['threads']} CPU"
        f" threads, peak RSS {card['compute']['peak_rss_mib']} MiB",
        "",
        "## Gate",
        "",
        f"passed: **{g['passed']}** against production `{card['lineage']['parent']}`",
        "",
        "| split | production acc | candidate acc | production macro-F1 | candidate macro-F1 |",
        "|---|---|---|---|---|",
    ]
    for split in ("val", "golden"):
        p, c = g[f"{split}_production"], g[f"{split}_candidate"]
        lines.append(
            f"| {split} | {p['accuracy']} | {c['accuracy']} | {p['macro_f1']} | {c['macro_f1']} |"
        )
    t = card["evaluation"]["test_report"]
    lines += [
        "",
        f"Test split (report only): production {t['production'].get('accuracy')},"
        f" candidate {t['candidate'].get('accuracy')} accuracy on {t['candidate'].get('n')} windows.",
        "",
        f"Residual speech rate: {card['residual_speech_rate']}. Privacy review:"
        f" {card['privacy_review']}. SBOM of the training environment: `{SBOM_FILE}`"
        " (signed with the bundle).",
        "",
    ]
    return "\n".join(lines)


def run_training(cfg: SidecarConfig) -> dict[str, Any]:
    """One run; its progress and outcome go to the trainer's textfile (train_metrics)."""
    with tracked(textfile_path(cfg)) as progress:
        return _run(cfg, progress)


def _run(cfg: SidecarConfig, progress: TrainProgress) -> dict[str, Any]:
    t0 = time.monotonic()
    cfg.check_residency()
    audit = cfg.open_audit()
    base = load_base_model(cfg.base_model_dir)
    registry = Registry(cfg.data_dir / "registry")
    # Seconds alone collide when two runs start within one second (seen in the tests).
    run_id = time.strftime("run-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(3)
    run_dir = cfg.data_dir / "runs" / run_id
    scanner = load_scanner(cfg.data.speech_scanner) if cfg.data.speech_scanner else None
    store = open_store(cfg)
    try:
        ds = build_dataset(store, cfg.data_dir / "datasets", cfg.data, scanner)
        _quarantine(store, ds, cfg, audit, run_id)
    except StoreError as e:  # e.g. a corrupt stored window: name it, build nothing
        raise _refuse(audit, run_id, "corrupt_sample", f"cannot build the dataset: {e}") from e
    finally:
        store.close()
    prep = ds.manifest["preparation"]
    audit.append(
        "dataset.built",
        ds.dataset_id,
        manifest=str(ds.manifest_path),
        manifest_sha256=ds.manifest_sha256,
        counts=ds.manifest["split"]["counts"],
        removed={k: prep[k] for k in ("quality_removed", "exact_duplicates", "near_duplicates")},
        legal_basis=cfg.data.legal_basis,
    )
    _check_dataset(ds, cfg, audit, run_id)
    x_tr, y_tr = ds.splits["train"].features, _labels(ds, "train")
    x_val, y_val = ds.splits["val"].features, _labels(ds, "val")
    val_devices = [s.device_id for s in ds.val]
    # The base distribution, frozen at pretraining: replay.npz and golden.npz of the base.
    replay, golden = load_reference_sets(
        base, cfg.train.replay_per_class, cfg.train.golden_per_class
    )

    t_train = time.monotonic()
    # keyed by the dataset: `train` started again after a kill resumes the same run
    checkpoints = cfg.data_dir / "checkpoints" / ds.dataset_id[:16]
    try:
        tuned = fine_tune(
            base,
            x_tr,
            y_tr,
            replay=replay,
            out_dir=run_dir / "adapter",
            method=cfg.train.method,
            rank=cfg.train.rank,
            targets=cfg.train.targets,
            epochs=cfg.train.epochs,
            seed=cfg.train.seed,
            lr=LEARNING_RATES[cfg.train.method],
            checkpoint_dir=checkpoints,
            val=(x_val, y_val),
            monitor=ProgressMonitor(progress, RunMonitor(audit, run_id, run_dir / "metrics.jsonl")),
            checkpoint_every=cfg.train.checkpoint_every,
            log_every=cfg.train.log_every,
            price_per_hour=cfg.train.price_per_hour,
            budget=cfg.train.budget,
        )
    except TrainingError as e:
        audit.append("train.failed", run_id, dataset_id=ds.dataset_id, error=str(e)[:300])
        raise
    adapter_dir = tuned.adapter_dir
    shutil.rmtree(checkpoints, ignore_errors=True)
    train_s = time.monotonic() - t_train
    _check_finite(adapter_dir, audit, run_id)
    audit.append(
        "train.finished", run_id, dataset_id=ds.dataset_id, seconds=round(train_s, 1),
        rank=cfg.train.rank, method=cfg.train.method,
    )  # fmt: skip

    # The artifact's bytes stay in memory from here: what is gated is what is signed.
    artifact = convert_for_edge(adapter_dir, base)
    write_atomic(run_dir / "edge-adapter.safetensors", artifact, 0o644)
    try:
        merged_int8, gated = merge_for_gate(base, artifact)
    except TrainingError as exc:
        raise _refuse(audit, run_id, "merge", str(exc)) from exc
    candidate = run_dir / "candidate.int8.onnx"
    write_atomic(candidate, merged_int8, 0o644)

    progress.phase("gate")
    parent, production = production_model(registry, base)
    latency = median_latency_ms([production, candidate], x_val)
    decision = judge(
        score(production, x_val, y_val, val_devices),
        score(candidate, x_val, y_val, val_devices),
        score(production, *golden),
        score(candidate, *golden),
        (latency[0], latency[1]),
        cfg.train,
        membership_auc(candidate, (x_tr, y_tr), (x_val, y_val)),
        len(y_val),
    )
    decision["production_version"] = parent
    decision["gated"] = asdict(gated)
    # what the fleet hears, not only hard cases: the devices' random `audit` samples
    rep = np.array([s.reason == "audit" for s in ds.val], dtype=bool)
    decision["val_representative"] = {
        "n": int(rep.sum()),
        "production": score(production, x_val[rep], y_val[rep]),
        "candidate": score(candidate, x_val[rep], y_val[rep]),
    }
    write_atomic(run_dir / "gate.json", json.dumps(decision, indent=1).encode(), 0o644)
    audit.append(
        "gate.decision", run_id, passed=decision["passed"], failures=decision["failures"],
        production=parent, dataset_id=ds.dataset_id,
    )  # fmt: skip
    if not decision["passed"]:
        raise GateRejectedError(
            f"candidate {run_id} did not pass the gate against {parent}: "
            + "; ".join(decision["failures"])
        )

    clips = encode_golden(*golden_clips(*golden))
    clips_x, clips_y = parse_golden(clips)  # scored exactly as the devices will read them
    write_atomic(run_dir / GOLDEN_CLIPS, clips, 0o644)
    expect = {"n": len(clips_y), "accuracy": score(candidate, clips_x, clips_y)["accuracy"]}
    write_atomic(run_dir / GOLDEN_CLIPS_META, json.dumps(expect).encode(), 0o644)
    x_te, y_te = ds.splits["test"].features, _labels(ds, "test")
    te_devices = [s.device_id for s in ds.test]
    version = registry.next_version(base.sha256_fp32)
    lineage = {
        "base_sha256": base.sha256_fp32,
        "dataset_id": ds.dataset_id,
        "dataset_manifest_sha256": ds.manifest_sha256,
        "parent": parent,
    }
    card = {
        "version": version,
        "run_id": run_id,
        "lineage": lineage,
        "adapter_format": "peft-lora + lora-lowrank-v1 (edge)",
        "hyperparameters": {
            "rank": cfg.train.rank if cfg.train.method == "lora" else "full",
            "alpha": cfg.train.rank if cfg.train.method == "lora" else "rank (scale 1)",
            "targets": list(cfg.train.targets if cfg.train.method == "lora" else ADAPTABLE_LAYERS),
            "epochs": cfg.train.epochs,
            "learning_rate": LEARNING_RATES[cfg.train.method],
            **tuned.record.as_card(),
            "seed": cfg.train.seed,
            "replay_per_class": cfg.train.replay_per_class,
        },
        "data": {
            "manifest_sha256": ds.manifest_sha256,
            "governance": ds.manifest["governance"],
            "n": ds.manifest["split"]["counts"],
            "preparation": prep,
        },
        "compute": {
            "train_seconds": round(train_s, 1),
            "threads": TRAIN_THREADS,
            "device": str(training_device()),  # accelerate's under `accelerate launch`
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "evaluation": {
            "gate": decision,
            "test_report": {
                "production": score(production, x_te, y_te, te_devices),
                "candidate": score(candidate, x_te, y_te, te_devices),
            },
        },
        "sbom": {"file": SBOM_FILE, "format": "CycloneDX 1.6 JSON (cyclonedx-python-lib)"},
        "residual_speech_rate": prep["residual_speech"]["rate"] if scanner else None,
        "privacy_review": "pending: recorded by `release approve`",
        "region": cfg.region,
        "classes": list(CLASSES),
    }

    # The bundle: written in a temp dir beside its final place, signed, then renamed.
    final = registry.bundle_dir(version)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{version}."))
    try:
        shutil.copytree(adapter_dir, tmp / "adapter")
        for name in (
            "edge-adapter.safetensors", "candidate.int8.onnx", "gate.json",
            GOLDEN_CLIPS, GOLDEN_CLIPS_META,
        ):  # fmt: skip
            shutil.copy2(run_dir / name, tmp / name)
        shutil.copy2(ds.manifest_path, tmp / "dataset.json")
        write_atomic(tmp / "model_card.json", json.dumps(card, indent=1).encode(), 0o644)
        write_atomic(tmp / "model_card.md", _model_card_md(card).encode(), 0o644)
        write_sbom(tmp, "sovereign-edge cloud_sidecar training", version)  # signed below
        index = bundle_index(tmp)
        write_atomic(tmp / BUNDLE_INDEX, index, 0o644)
        hsm = open_hsm(cfg)
        try:
            sig = hsm.sign_digest(hashlib.sha256(index).digest())
            key_id = hsm.signing_key_id()
        finally:
            hsm.close()
        write_atomic(
            tmp / BUNDLE_SIG,
            json.dumps({"alg": "ecdsa-p256-sha256", "key_id": key_id, "sig": sig.hex()}).encode(),
            0o644,
        )
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    registry.add(version, lineage, run_id=run_id, gate_passed=True)
    audit.append(
        "registry.added", version, run_id=run_id, bundle_sha256=registry.get(version)["bundle_sha256"],
        signing_key=key_id, **lineage,
    )  # fmt: skip
    result = {
        "run_id": run_id,
        "version": version,
        "dataset_id": ds.dataset_id,
        "dataset_manifest_sha256": ds.manifest_sha256,
        "gate": decision,
        "bundle_dir": str(final),
        "adapter_dir": str(final / "adapter"),
        "edge_adapter": str(final / "edge-adapter.safetensors"),
        "edge_adapter_bytes": len(artifact),
        "adapter_peft_bytes": sum(p.stat().st_size for p in (final / "adapter").iterdir()),
        "edge_adapter_sha256": file_sha256(final / "edge-adapter.safetensors"),
        "ota_repo_dir": str(cfg.ota_repo_dir),
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_atomic(
        cfg.data_dir / "runs" / "latest.json", json.dumps(result, indent=1).encode(), 0o644
    )
    return result
