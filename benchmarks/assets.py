"""Inputs the benchmarks share, built once into ``benchmarks/.cache`` (gitignored).

- the base model: the synthetic city written as a dataset (``devstack.dataset``, its
  defaults: event segments of scene streams of its own seeds, never these scenes) and
  ``cloud_sidecar.pretrain`` on it with seed 0, the same recipe the demo flashes onto
  devices; reused while its files match its model card (the directory is named after
  the dataset recipe, so a base of an older recipe is not picked up);
- scene audio: ``devstack.scene.stream`` rendered as a device hears it (two-tone
  siren the base never saw, 10% of the time speech), written as 16-bit WAV (what a
  file capture reads) with its ground truth beside it (window labels, and which
  windows hold speech); keyed by seed and duration; rendered in 10-minute chunks (the
  generator's limit), chunk k with seed + k.
"""

from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cloud_sidecar.pretrain import BaseModel

CACHE = Path(__file__).resolve().parent / ".cache"
CHUNK_S = 600  # the scene generator renders at most 10 min at once; chunk k has seed + k
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneFiles:
    wav: Path
    window_labels: tuple[str, ...]
    duration_s: int
    speech_windows: tuple[bool, ...]  # True where a window holds a ground-truth speech frame


def base_model(quick: bool = False, cache: Path = CACHE) -> BaseModel:
    """The base model, pretrained on first use; ``quick``: a tiny one for smoke runs
    (3 clips per class, one epoch: its figures are meaningless, its code path is not)."""
    from cloud_sidecar.errors import TrainingError
    from cloud_sidecar.pretrain import load_base_model
    from devstack.dataset import pretrain_synthetic

    base_dir = cache / ("base-scene-quick" if quick else "base-scene-seed0")
    try:
        return load_base_model(base_dir)
    except TrainingError:
        log.info("pretraining the base model into %s (once)", base_dir)
        if quick:
            return pretrain_synthetic(base_dir, seed=0, per_class=3, epochs=1)
        return pretrain_synthetic(base_dir, seed=0)


def base_model_int8_fp32(cache: Path = CACHE) -> tuple[Path, Path]:
    """(int8, fp32) ONNX paths of the base model, pretraining it on first use."""
    base = base_model(cache=cache)
    return base.onnx_int8, base.onnx_fp32


def scene_files(duration_s: int, seed: int = 42, cache: Path = CACHE) -> SceneFiles:
    """A rendered scene as a 16-bit mono WAV plus its per-window labels."""
    from devstack.scene.stream import SceneSpec, render_scene

    wav = cache / f"scene-{seed}-{duration_s}s.wav"
    labels_path = wav.with_suffix(".labels.txt")
    speech_path = wav.with_suffix(".speech.txt")
    if not (wav.exists() and labels_path.exists() and speech_path.exists()):
        log.info("rendering %d s of scene audio into %s (once)", duration_s, wav)
        parts: list[np.ndarray] = []
        labels_out: list[str] = []
        speech_out: list[str] = []
        for k, start in enumerate(range(0, duration_s, CHUNK_S)):
            scene = render_scene(
                SceneSpec(
                    seed=seed + k,
                    duration_s=min(CHUNK_S, duration_s - start),
                    siren_pattern="hilo",
                    speech_rate=0.1,
                )
            )
            parts.append(scene.audio)
            labels_out.extend(scene.window_labels)
            speech_out.extend("1" if s else "0" for s in scene.speech_windows())
        audio = np.concatenate(parts)
        pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = wav.with_suffix(".tmp")
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16_000)
            w.writeframes(pcm.tobytes())
        tmp.replace(wav)
        labels_path.write_text("\n".join(labels_out) + "\n")
        speech_path.write_text("\n".join(speech_out) + "\n")
    labels = tuple(labels_path.read_text().split())
    speech = tuple(s == "1" for s in speech_path.read_text().split())
    return SceneFiles(wav, labels, duration_s, speech)
