"""The sidecar's ML pipeline end to end on real components: a SQLite store holding
labelled uploads, the base model pretrained by the session fixture, a SoftHSM token
(devstack) signing the bundle. train → registry (candidate) → refused publish without
approval → approve → publish (signed into the OTA repository) → the next run is judged
against that production adapter."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar import ota_publish
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.errors import RegistryError, TrainingError
from cloud_sidecar.keys.hsm import Hsm
from cloud_sidecar.pretrain import BaseModel, _load_npz
from cloud_sidecar.registry import Registry, verify_bundle
from cloud_sidecar.release import GOLDEN_TOLERANCE, approve, publish
from cloud_sidecar.store import LabelSpan, Store
from cloud_sidecar.store_api import open_store
from cloud_sidecar.train import run_training
from devstack.softhsm import init_token
from fleet_model.golden import parse_golden
from fleet_protocol import batch
from fleet_protocol.labels import CLASSES

T0 = 1_764_000_000_000


def _pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _config(tmp: Path, base: BaseModel, **train: Any) -> SidecarConfig:
    token = init_token(tmp / "hsm")
    (tmp / "hsm" / "pin").write_text(token.user_pin)
    os.environ.update(token.env())
    with Hsm(str(token.module), token.label, token.user_pin) as hsm:
        hsm.ensure_keys()
    dummy = tmp / "unused.pem"
    return SidecarConfig.model_validate(
        {
            "data_dir": tmp / "data",
            "region": "eu-central-1",
            "base_model_dir": base.dir,
            "broker": {
                "ca_cert": dummy, "client_cert": dummy, "client_key": dummy,
                "region": "on-prem-de",
            },
            "hsm": {
                "module": token.module, "token_label": token.label,
                "pin_file": tmp / "hsm" / "pin", "env": token.env(), "region": "on-prem-de",
            },
            "train": {
                "epochs": 2, "rank": 2, "min_samples": 8, "replay_per_class": 4,
                # the gate's rules are unit-tested (tests/unit/test_gate.py); here the
                # flow is: a small noisy model must not be refused by chance
                "max_class_recall_drop": 1.0, "max_golden_drop": 1.0, "min_val_gain": -1.0,
                "max_macro_f1_drop": 1.0, "max_device_accuracy_drop": 1.0,
                "max_membership_auc": 1.0, **train,
            },
        }
    )  # fmt: skip


def _upload_labelled(cfg: SidecarConfig, x: np.ndarray, y: np.ndarray, seq: int) -> None:
    """Store ``x`` as uploads of two devices and label each window with ``y``."""
    store = open_store(cfg)  # features sealed under data keys wrapped by the token
    try:
        for dev_i, device in enumerate(("pi-00", "pi-01")):
            if store.device(device) is None:
                store.register_device(device, _pem())
            idx = np.arange(dev_i, len(x), 2)
            t0 = T0 + seq * 10_000_000
            metas = tuple(
                batch.SampleMeta(
                    sample_id=os.urandom(16).hex(),
                    captured_at_ms=t0 + 2000 * k,
                    stream_offset_s=0.0,
                    predicted="horn",
                    score=0.4,
                    model_sha256="ab" * 32,
                    reason="low_confidence",
                )
                for k in range(len(idx))
            )
            store.put_batch(
                f"b-{device}-{seq}", seq, "d" * 64,
                batch.Batch(device, metas, x[idx].astype(np.float16)),
            )  # fmt: skip
            spans = [
                LabelSpan(device, t0 + 2000 * k, t0 + 2000 * k + 1000, CLASSES[int(y[i])])
                for k, i in enumerate(idx)
            ]
            store.add_labels(spans, "incidents", f"i-{device}-{seq}")
    finally:
        store.close()


def _audit(cfg: SidecarConfig) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (cfg.data_dir / "audit.jsonl").read_text().splitlines()]


def _train_prom(cfg: SidecarConfig) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (cfg.data_dir / "metrics" / "train.prom").read_text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_single_class_dataset_is_refused_audited_and_leaves_no_bundle(
    base_model: BaseModel, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, base_model)
    x, y = _load_npz(base_model.golden)
    one = y == y[0]
    _upload_labelled(cfg, x[one], y[one], 0)
    with pytest.raises(TrainingError, match="at least two"):
        run_training(cfg)
    refused = [e for e in _audit(cfg) if e["kind"] == "train.refused"]
    assert refused and refused[-1]["details"]["reason"] == "single_class"
    assert Registry(cfg.data_dir / "registry").entries() == []
    prom = _train_prom(cfg)  # the trainer's textfile says the run failed, in `dataset`
    assert prom[("sidecar_train_failed", ())] == 1
    assert prom[("sidecar_train_phase", (("phase", "dataset"),))] == 1


def test_train_registers_a_signed_bundle_that_only_an_approval_lets_reach_ota(
    base_model: BaseModel, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, base_model)
    x, y = _load_npz(base_model.golden)
    rx, ry = _load_npz(base_model.replay)
    _upload_labelled(cfg, np.concatenate([x, rx]), np.concatenate([y, ry]), 0)

    run = run_training(cfg)
    registry = Registry(cfg.data_dir / "registry")
    assert run["version"] == "1.0.0"
    prom = _train_prom(cfg)  # the trainer's textfile, as node_exporter would export it
    assert prom[("sidecar_train_phase", (("phase", "registered"),))] == 1
    assert prom[("sidecar_train_gate_passed", ())] == 1 and prom[("sidecar_train_failed", ())] == 0
    assert prom[("sidecar_train_steps_total", ())] == prom[("sidecar_train_steps_planned", ())] > 0
    assert prom[("sidecar_train_loss", ())] > 0 and prom[("sidecar_train_val_loss", ())] > 0
    entry = registry.get("1.0.0")
    assert entry["aliases"] == ["candidate"] and entry["lineage"]["parent"] == "base"
    bundle = Path(run["bundle_dir"])
    for name in (
        "adapter/adapter_config.json",
        "edge-adapter.safetensors",
        "gate.json",
        "model_card.json",
        "model_card.md",
        "dataset.json",
        "bundle.json",
    ):
        assert (bundle / name).is_file(), name  # fmt: skip
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["data"]["manifest_sha256"] == run["dataset_manifest_sha256"]
    assert card["data"]["governance"]["legal_basis"] == cfg.data.legal_basis
    assert set(card["evaluation"]["test_report"]) == {"production", "candidate"}
    built = [e for e in _audit(cfg) if e["kind"] == "dataset.built"]
    assert built[-1]["details"]["manifest_sha256"] == run["dataset_manifest_sha256"]

    # the bundle's signature is the HSM's, over bundle.json
    sig = json.loads((bundle / "bundle.sig").read_text())
    with Hsm(str(cfg.hsm.module), cfg.hsm.token_label, cfg.hsm.pin()) as hsm:
        key = serialization.load_pem_public_key(hsm.signing_public_key_pem())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(
        bytes.fromhex(sig["sig"]), (bundle / "bundle.json").read_bytes(), ec.ECDSA(hashes.SHA256())
    )

    # the adapter loads with stock PEFT
    import torch
    from peft import PeftModel

    from cloud_sidecar.model import AudioCNN

    module = AudioCNN(len(CLASSES))
    module.load_state_dict(torch.load(base_model.state_dict, weights_only=True))
    peft_model = PeftModel.from_pretrained(module, str(bundle / "adapter"))
    assert peft_model(torch.from_numpy(x[:2])).shape == (2, len(CLASSES))

    # no approval: refused and audited; nothing signed for the OTA channel
    with pytest.raises(RegistryError, match="no approval"):
        publish(cfg, "1.0.0", broker=False)
    assert _audit(cfg)[-1]["kind"] == "release.refused"
    assert not (cfg.ota_repo_dir / "metadata" / "targets.json").exists()
    with pytest.raises(RegistryError):
        approve(cfg, "1.0.0", "  ")

    record = approve(cfg, "1.0.0", "Dr. A. Reviewer", "privacy review PR-7")
    assert _audit(cfg)[-1]["kind"] == "release.approved"
    assert _audit(cfg)[-1]["details"]["approver"] == "Dr. A. Reviewer"
    assert record["bundle_sha256"] == verify_bundle(bundle)
    out = publish(cfg, "1.0.0", broker=False)
    assert out["alias"] == "production" and out["adapter_version"] >= 1
    assert registry.alias("production") == "1.0.0"
    targets = json.loads((cfg.ota_repo_dir / "metadata" / "targets.json").read_text())
    target = next(iter(targets["signed"]["targets"].values()))
    artifact = (bundle / "edge-adapter.safetensors").read_bytes()
    assert target["hashes"]["sha256"] == hashlib.sha256(artifact).hexdigest()
    # golden clips with their labels: signed in the bundle, then a TUF target of their own
    clips_x, clips_y = parse_golden((bundle / "golden-clips.bin").read_bytes())
    assert len(clips_y) == len(clips_x) > 0 and set(clips_y.tolist()) == set(y.tolist())
    expected = json.loads((bundle / "golden-clips.json").read_text())
    assert expected["n"] == len(clips_y) and 0 <= expected["accuracy"] <= 1
    if ota_publish.tuf_available():
        files = ota_publish.open_repository(cfg, None).target_files()
        adapter_t = next(t for t in files.values() if "adapter_version" in (t.custom or {}))
        golden_t = files[adapter_t.custom["golden_target"]]
        assert golden_t.custom == {"golden_for": adapter_t.path}
        assert adapter_t.custom["golden_min_percent"] == max(
            0, math.floor((expected["accuracy"] - GOLDEN_TOLERANCE) * 100 + 1e-9)
        )
        golden_file = ota_publish.tuf_repo_dir(cfg) / "targets"
        golden_file = golden_file / f"{golden_t.hashes['sha256']}.{golden_t.path}"
        assert golden_file.read_bytes() == (bundle / "golden-clips.bin").read_bytes()

    # the next run is judged against the adapter the devices now run
    _upload_labelled(cfg, rx, ry, 1)
    second = run_training(cfg)
    assert second["version"] == "1.1.0"
    assert second["gate"]["production_version"] == "1.0.0"
    assert registry.get("1.1.0")["lineage"]["parent"] == "1.0.0"

    # a bundle edited after signing is refused before publication
    approve(cfg, "1.1.0", "Dr. A. Reviewer")
    (Path(second["bundle_dir"]) / "gate.json").write_text('{"passed": true}')
    with pytest.raises(RegistryError, match="changed after"):
        publish(cfg, "1.1.0", broker=False)


def test_a_corrupt_stored_window_is_named_refused_and_audited(
    base_model: BaseModel, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, base_model)
    x, y = _load_npz(base_model.golden)
    _upload_labelled(cfg, x, y, 0)
    store = open_store(cfg)
    assert isinstance(store, Store)
    (sid,) = store._db.execute("SELECT sample_id FROM samples LIMIT 1").fetchone()
    store._db.execute("UPDATE samples SET features=? WHERE sample_id=?", (b"garbage", sid))
    store.close()
    with pytest.raises(TrainingError, match=sid):
        run_training(cfg)
    assert _audit(cfg)[-1]["kind"] == "train.refused"
    assert _audit(cfg)[-1]["details"]["reason"] == "corrupt_sample"
    assert Registry(cfg.data_dir / "registry").entries() == []


def test_full_fine_tuning_signs_a_bundle_with_its_method_an_sbom_and_a_stock_peft_adapter(
    base_model: BaseModel, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel

    from cloud_sidecar.lora import _load_base_module
    from cloud_sidecar.sbom import read_sbom

    cfg = _config(tmp_path, base_model, method="full")
    x, y = _load_npz(base_model.golden)
    rx, ry = _load_npz(base_model.replay)
    _upload_labelled(cfg, np.concatenate([x, rx]), np.concatenate([y, ry]), 0)
    run = run_training(cfg)
    bundle = Path(run["bundle_dir"])
    card = json.loads((bundle / "model_card.json").read_text())
    hp = card["hyperparameters"]
    assert hp["method"] == "full" and hp["rank"] == "full" and hp["learning_rate"] == 1e-3
    assert hp["trainable_parameters"] > 0.99 * hp["total_parameters"]
    assert hp["factorisation_residual"] < 1e-4
    assert "QLoRA is not available" in hp["qlora"]
    assert "method: full" in (bundle / "model_card.md").read_text()
    peft_model = PeftModel.from_pretrained(_load_base_module(base_model), str(bundle / "adapter"))
    assert peft_model(torch.from_numpy(x[:2])).shape == (2, len(CLASSES))

    # the SBOM is in the bundle, listed in bundle.json (which the HSM signed), and parses
    index = json.loads((bundle / "bundle.json").read_text())["files"]
    sbom = (bundle / "sbom.cdx.json").read_bytes()
    assert index["sbom.cdx.json"] == hashlib.sha256(sbom).hexdigest()
    assert card["sbom"]["file"] == "sbom.cdx.json"
    assert any(c.name == "peft" for c in read_sbom(sbom).components)
    verify_bundle(bundle)
    (bundle / "sbom.cdx.json").write_bytes(sbom.replace(b'"peft"', b'"pefx"'))
    with pytest.raises(RegistryError, match="changed after"):
        verify_bundle(bundle)
