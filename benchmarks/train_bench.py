"""Training benchmarks: the base model on the bench's scene, and the edge adapter's size.

- ``scene_scores``: the base model, fp32 and int8 (the files devices get), on the
  bench's scene (``assets.scene_files``: the hour the edge section streams, two-tone
  sirens the base never saw, speech 10% of the time), scored on every window that holds
  no ground-truth speech frame (the windows the privacy gate exists to release; the
  edge section scores the windows its gate did release, ``edge.*_macro_f1``). Macro-F1
  over the classes present in truth or prediction, as ``benchmarks.edge.macro_f1``;
  per-class F1 into a table for BENCHMARKS.md.
- ``adapter_figures``: what one device's adapter costs and gains. A separate scene
  (seed ``ADAPTER_SCENE_SEED``, never the bench's; two-tone sirens, speech 10%) stands
  for what a device uploads and the city labels: its speech-free windows, plus the
  base's replay set, train a LoRA adapter with the sidecar's configured defaults
  (``TrainConfig``: rank, targets, epochs, replay), converted to the edge format
  (``lora-lowrank-v1``, what OTA ships). ``train.adapter_over_base_bytes`` = those bytes
  / the int8 base model's bytes; the adapter merged and quantized as a device does
  (``cloud_sidecar.train.merge_for_gate``) is scored on the bench scene as above.
"""

from __future__ import annotations

import logging
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from benchmarks import assets
from benchmarks.edge import macro_f1

if TYPE_CHECKING:
    from cloud_sidecar.pretrain import BaseModel

log = logging.getLogger(__name__)

ADAPTER_SCENE_SEED = 500_000  # the device's own street: not the bench's 42..47, not pretraining's
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SceneWindows:
    x: F32  # (N, 20, 8) upload features of the speech-free windows
    labels: tuple[str, ...]
    all_windows: int


def wav_windows(wav: Path) -> F32:
    """Upload features of every whole 1-s window of a 16-bit mono WAV."""
    from fleet_protocol.features import WINDOW_SAMPLES, features_batch

    with wave.open(str(wav), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    n = len(pcm) // WINDOW_SAMPLES
    audio = (pcm[: n * WINDOW_SAMPLES].astype(np.float32) / 32768.0).reshape(n, WINDOW_SAMPLES)
    chunks = [features_batch(audio[i : i + 256]) for i in range(0, n, 256)]
    return np.concatenate(chunks)


def scene_windows(scene: assets.SceneFiles) -> SceneWindows:
    x = wav_windows(scene.wav)
    keep = [i for i, s in enumerate(scene.speech_windows) if not s and i < len(x)]
    return SceneWindows(x[keep], tuple(scene.window_labels[i] for i in keep), len(x))


def per_class_f1(truth: list[str], predicted: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in sorted(set(truth) | set(predicted)):
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        wrong = sum((t == c) != (p == c) for t, p in zip(truth, predicted, strict=True))
        out[c] = 2 * tp / (2 * tp + wrong) if tp + wrong else 1.0
    return out


def _predict(model: Path | bytes, x: F32) -> list[str]:
    import onnxruntime as ort

    from fleet_protocol.labels import CLASSES

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"features": x})
    return [CLASSES[int(k)] for k in np.asarray(probs).argmax(axis=1)]


def scene_scores(
    fp32: Path, int8: Path, windows: SceneWindows
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(keys, per-class F1 by model) of the base on the scene's speech-free windows."""
    truth = list(windows.labels)
    preds = {"fp32": _predict(fp32, windows.x), "int8": _predict(int8, windows.x)}
    keys = {
        "train.base_scene_macro_f1": macro_f1(truth, preds["int8"]),
        "train.base_scene_fp32_macro_f1": macro_f1(truth, preds["fp32"]),
        "train.scene_windows": float(len(truth)),
    }
    return keys, {name: per_class_f1(truth, p) for name, p in preds.items()}


def device_set(duration_s: int, seed: int = ADAPTER_SCENE_SEED) -> tuple[F32, I64]:
    """Features and labels of a device's labelled street (speech-free windows)."""
    from fleet_protocol.labels import CLASS_INDEX

    scene = assets.scene_files(duration_s, seed=seed)
    w = scene_windows(scene)
    return w.x, np.array([CLASS_INDEX[c] for c in w.labels], dtype=np.int64)


def adapter_figures(
    base: BaseModel, device: tuple[F32, I64], windows: SceneWindows
) -> tuple[dict[str, float], dict[str, float]]:
    """(keys, per-class F1 of the adapted int8 model on the bench scene)."""
    from cloud_sidecar.config import TrainConfig
    from cloud_sidecar.lora import convert_for_edge, train_adapter
    from cloud_sidecar.pretrain import load_reference_sets
    from cloud_sidecar.train import LEARNING_RATE, merge_for_gate

    cfg = TrainConfig()
    replay, _golden = load_reference_sets(base, cfg.replay_per_class, cfg.golden_per_class)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        peft_dir = train_adapter(
            base,
            *device,
            replay=replay,
            out_dir=Path(tmp) / "adapter",
            rank=cfg.rank,
            targets=cfg.targets,
            epochs=cfg.epochs,
            seed=cfg.seed,
            lr=LEARNING_RATE,
        )
        artifact = convert_for_edge(peft_dir, base)
    train_s = time.monotonic() - t0
    merged_int8, _gated = merge_for_gate(base, artifact)
    truth = list(windows.labels)
    pred = _predict(merged_int8, windows.x)
    keys = {
        "train.adapter_over_base_bytes": len(artifact) / base.onnx_int8.stat().st_size,
        "train.adapter_bytes": float(len(artifact)),
        "train.base_int8_bytes": float(base.onnx_int8.stat().st_size),
        "train.adapter_scene_macro_f1": macro_f1(truth, pred),
        "train.adapter_train_s": train_s,
        "train.adapter_rank": float(cfg.rank),
        "train.adapter_layers": float(len(cfg.targets)),
    }
    return keys, per_class_f1(truth, pred)


def pretrain_seconds(base: BaseModel) -> float:
    """Seconds the base's pretraining took (reading the data + training, from its card)."""
    import json

    card = json.loads(base.card.read_text())
    return float(card["training"]["training_seconds"])


def render_table(per_class: dict[str, dict[str, float]]) -> str:
    """Per-class F1 on the bench scene, one column per model."""
    from fleet_protocol.labels import CLASSES

    names = list(per_class)
    rows = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in CLASSES:
        cells = [f"{per_class[n][c]:.3f}" if c in per_class[n] else "" for n in names]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_train(minutes: int, quick: bool, adapter_scene_s: int) -> tuple[dict[str, float], str]:
    """All ``train.*`` keys and the per-class table."""
    base = assets.base_model(quick=quick)
    windows = scene_windows(assets.scene_files(minutes * 60))
    keys, per_class = scene_scores(base.onnx_fp32, base.onnx_int8, windows)
    log.info("adapter: trained on %d s of a device's street", adapter_scene_s)
    adapter_keys, adapted = adapter_figures(base, device_set(adapter_scene_s), windows)
    keys |= adapter_keys
    keys["train.adapter_scene_macro_f1_gain"] = (
        keys["train.adapter_scene_macro_f1"] - keys["train.base_scene_macro_f1"]
    )
    keys["train.base_pretrain_s"] = pretrain_seconds(base)
    table = render_table(
        {"base fp32": per_class["fp32"], "base int8": per_class["int8"], "adapted int8": adapted}
    )
    return keys, table
