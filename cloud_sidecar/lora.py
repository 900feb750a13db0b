"""LoRA adapters for the base model: train with PEFT, evaluate, convert for the edge.

Owns the adapter lifecycle on the cloud side. Invariants:

- the base weights are frozen; only LoRA factors on ``ADAPTABLE_LAYERS`` (every Conv2d
  and Linear of ``AudioCNN``) train, and the adapter is saved in PEFT's own format
  (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``convert_for_edge`` maps each adapted layer to the initializer that holds its weight
  in the base's exported ONNX graph (read from the graph, not assumed) and returns the
  ``lora-lowrank-v1`` artifact's bytes with the base model's fp32 sha256: what
  ``fleet_model`` parses and merges on the device (and in ``train``, which judges the
  merged int8 model before anything is signed);
- training is deterministic given ``seed`` and the inputs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from cloud_sidecar.adapter_fit import FitPlan, Monitor, fit
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from cloud_sidecar.pretrain import TRAIN_THREADS, BaseModel, torch_threads
from fleet_model import EdgeAdapter, LowRankLayer, encode_edge_adapter
from fleet_protocol.io.files import file_sha256
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_PEFT_CONFIG_BYTES = 64 * 1024
MAX_PEFT_WEIGHTS_BYTES = 16 * 1024 * 1024
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _load_base_module(base: BaseModel) -> AudioCNN:
    model = AudioCNN(len(CLASSES))
    model.load_state_dict(torch.load(base.state_dict, map_location="cpu", weights_only=True))
    model.eval()
    return model


def train_adapter(
    base: BaseModel,
    features: F32,
    labels: I64,
    *,
    replay: tuple[F32, I64] | None,
    out_dir: Path,
    rank: int = 8,
    targets: tuple[str, ...] = ADAPTABLE_LAYERS,
    epochs: int = 12,
    seed: int = 0,
    lr: float = 5e-3,
    threads: int = TRAIN_THREADS,
    checkpoint_dir: Path | None = None,
    val: tuple[F32, I64] | None = None,
    monitor: Monitor | None = None,
    checkpoint_every: int = 50,
    log_every: int = 10,
    price_per_hour: float = 0.0,
    budget: float = 0.0,
) -> Path:
    """Train a rank-``rank`` LoRA adapter on ``features``/``labels`` (+ ``replay``).

    ``replay`` holds samples of the base training distribution, mixed in so the adapter
    does not forget the classes the new data lacks. Writes PEFT's files into ``out_dir``
    (which must not hold an adapter already) and returns it. With ``checkpoint_dir``, a
    run started again after a kill resumes from its last checkpoint and ends with the
    same adapter (``cloud_sidecar.adapter_fit``); ``monitor`` receives metrics and alerts.
    """
    if features.ndim != 3 or len(features) != len(labels) or len(labels) == 0:
        raise TrainingError(f"features {features.shape} and labels {labels.shape} do not pair")
    if (out_dir / PEFT_WEIGHTS).exists():
        raise TrainingError(f"{out_dir} already holds an adapter; refusing to overwrite it")
    if not targets or not set(targets) <= set(ADAPTABLE_LAYERS):
        raise TrainingError(
            f"LoRA targets {targets} must be a non-empty subset of {ADAPTABLE_LAYERS}"
        )
    t0 = time.monotonic()
    x, y = features.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)
    if replay is not None:
        x = np.concatenate([x, replay[0].astype(np.float32, copy=False)])
        y = np.concatenate([y, replay[1].astype(np.int64, copy=False)])
    torch.manual_seed(seed)
    model = _load_base_module(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    peft_model = get_peft_model(model, config)
    plan = FitPlan(
        epochs=epochs,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        price_per_hour=price_per_hour,
        budget=budget,
    )
    with torch_threads(threads):
        loss = fit(model, x, y, plan, checkpoint_dir=checkpoint_dir, val=val, monitor=monitor)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        peft_model.save_pretrained(str(tmp))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above that it holds no adapter)
        tmp.rename(out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"cannot save the adapter to {out_dir}: {exc}") from exc
    log.info(
        "trained rank-%d adapter on %d samples in %.1f s (loss %.4f)",
        rank,
        len(x),
        time.monotonic() - t0,
        loss,
    )
    return out_dir


def load_with_adapter(base: BaseModel, adapter_dir: Path) -> torch.nn.Module:
    """The base module with the adapter attached (unmerged), in eval mode."""
    model = PeftModel.from_pretrained(_load_base_module(base), str(adapter_dir))
    model.eval()
    return model


def _predict(model: torch.nn.Module | Path | bytes, features: F32) -> F32:
    if isinstance(model, Path | bytes):  # an ONNX file, or its bytes (scored as held)
        source = model if isinstance(model, bytes) else str(model)
        sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        (probs,) = sess.run(["probs"], {"features": features.astype(np.float32)})
        return np.asarray(probs, dtype=np.float32)
    model.eval()
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(features.astype(np.float32))).numpy())


def evaluate(
    model: torch.nn.Module | Path | bytes | None,
    features: F32,
    labels: I64,
    *,
    probs: F32 | None = None,
) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class recall of ``model`` (torch module or ONNX path).

    With ``model=None`` the predictions are taken from ``probs`` (``(N, C)`` scores),
    e.g. from the device runtime. Classes absent from ``labels`` get no recall entry
    and count in macro F1 only if they were predicted.
    """
    if model is None:
        if probs is None:
            raise TrainingError("evaluate needs a model or precomputed probs")
        scores = probs
    else:
        scores = _predict(model, features)
    pred = np.asarray(scores).argmax(axis=1)
    y = np.asarray(labels)
    recall: dict[str, float] = {}
    f1s: list[float] = []
    for c, name in enumerate(CLASSES):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if (y == c).any():
            recall[name] = round(tp / (tp + fn), 4)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "n": len(y),
        "accuracy": round(float((pred == y).mean()), 4) if len(y) else 0.0,
        "macro_f1": round(float(np.mean(f1s)), 4) if f1s else 0.0,
        "per_class_recall": recall,
    }


def _read_json_capped(path: Path, cap: int) -> dict[str, Any]:
    if path.stat().st_size > cap:
        raise TrainingError(f"{path} exceeds {cap} bytes")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise TrainingError(f"{path} is not a JSON object")
    return data


def _onnx_weight_initializers(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name -> initializer holding its weight, read from the exported graph."""
    inits = {t.name for t in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        layer = w.rsplit(".", 1)[0] if w.endswith(".weight") else None
        if w in inits and layer in ADAPTABLE_LAYERS:
            found[layer] = w
    return found


def convert_for_edge(adapter_dir: Path, base: BaseModel) -> bytes:
    """The ``lora-lowrank-v1`` artifact's bytes for the PEFT adapter in ``adapter_dir``."""
    from safetensors.numpy import load_file

    try:
        cfg = _read_json_capped(adapter_dir / PEFT_CONFIG, MAX_PEFT_CONFIG_BYTES)
        weights_path = adapter_dir / PEFT_WEIGHTS
        if weights_path.stat().st_size > MAX_PEFT_WEIGHTS_BYTES:
            raise TrainingError(f"{weights_path} exceeds {MAX_PEFT_WEIGHTS_BYTES} bytes")
        tensors = load_file(str(weights_path))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{adapter_dir} is not a PEFT LoRA adapter: {exc}") from exc
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise TrainingError("only plain LoRA adapters (no DoRA, no fan_in_fan_out) convert")
    if file_sha256(base.onnx_fp32) != base.sha256_fp32:
        raise TrainingError(f"{base.onnx_fp32} does not match the base model's sha256")
    graph = onnx.load(str(base.onnx_fp32))
    targets = _onnx_weight_initializers(graph)
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    layers: list[LowRankLayer] = []
    for layer in ADAPTABLE_LAYERS:
        a = tensors.get(f"base_model.model.{layer}.lora_A.weight")
        b = tensors.get(f"base_model.model.{layer}.lora_B.weight")
        if a is None or b is None:
            continue
        if layer not in targets:
            raise TrainingError(f"layer {layer} has no weight initializer in {base.onnx_fp32}")
        r = int(a.shape[0])
        alpha = float(alpha_pattern.get(layer, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers.append(
            LowRankLayer(targets[layer], a.astype(np.float32), b.astype(np.float32), scale)
        )
    if not layers:
        raise TrainingError(f"{adapter_dir} adapts none of {ADAPTABLE_LAYERS}")
    adapter = EdgeAdapter(
        base.sha256_fp32,
        tuple(layers),
        {
            "peft_version": peft.__version__,
            "peft_adapter_sha256": file_sha256(weights_path),
            "rank": str(max(x.rank for x in layers)),
        },
    )
    data = encode_edge_adapter(adapter)
    log.info("edge adapter: %d layers, %d bytes", len(layers), len(data))
    return data
