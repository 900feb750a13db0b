"""The synthetic city as a pretraining dataset: WAV files in the layout an operator's set uses.

Owns ``write_dataset`` (``devstack write-dataset``): ``per_class`` clips of every class
of ``fleet_protocol.labels.CLASSES``, written as ``OUT/<class>/<class>-NNNN.wav``
(16-bit PCM, mono, 16 kHz), plus ``OUT/dataset.json`` saying how they were made: the
folder-per-class layout that ``cloud-sidecar pretrain --dataset`` reads
(``docs/datasets.md``). Invariants:

- a clip is ``clip_seconds`` consecutive 1-s windows of one class from
  ``devstack.scene.windows.render_windows`` (each second its own event, background,
  SNR and gain: the windows pretraining used to render in memory), so the reader's
  windowing cuts them back out exactly and the base model learns what it learned before;
- the same ``seed`` writes the same bytes;
- the directory appears whole or not at all: files go into a temporary sibling that is
  renamed into place at the end; an existing non-empty ``OUT`` is refused.

``pretrain_synthetic`` writes such a set and pretrains on it in one call (tests and
benchmarks; the demo runs the CLI instead).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from devstack.errors import DevstackError
from devstack.scene.windows import render_windows
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES

if TYPE_CHECKING:
    from cloud_sidecar.pretrain import BaseModel

log = logging.getLogger(__name__)

DEFAULT_PER_CLASS = 40  # x DEFAULT_CLIP_SECONDS = 160 windows per class, 1600 in all
DEFAULT_CLIP_SECONDS = 4
MAX_PER_CLASS = 10_000
MAX_CLIP_SECONDS = 60
INFO_FILE = "dataset.json"


@dataclass(frozen=True)
class WrittenDataset:
    dir: Path
    files: int
    windows: int


def _wav_bytes(audio: np.ndarray) -> bytes:
    pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def write_dataset(
    out: Path,
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
    *,
    clip_seconds: int = DEFAULT_CLIP_SECONDS,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    classes: tuple[str, ...] = CLASSES,
) -> WrittenDataset:
    """Write the synthetic city as a folder-per-class dataset at ``out``."""
    if not 0 < per_class <= MAX_PER_CLASS:
        raise DevstackError(f"per_class must be in 1..{MAX_PER_CLASS}, got {per_class}")
    if not 0 < clip_seconds <= MAX_CLIP_SECONDS:
        raise DevstackError(f"clip_seconds must be in 1..{MAX_CLIP_SECONDS}, got {clip_seconds}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DevstackError(f"{out} exists and is not an empty directory; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    rng = np.random.default_rng(seed)
    try:
        for cls in classes:
            (tmp / cls).mkdir()
            for k in range(per_class):
                audio = render_windows([cls] * clip_seconds, rng, siren_patterns=siren_patterns)
                (tmp / cls / f"{cls}-{k:04d}.wav").write_bytes(_wav_bytes(audio.reshape(-1)))
        info = {
            "generator": "devstack.dataset.write_dataset (devstack.scene.windows.render_windows)",
            "layout": "folders",
            "seed": seed,
            "per_class": per_class,
            "clip_seconds": clip_seconds,
            "siren_patterns": list(siren_patterns),
            "classes": list(classes),
            "format": "WAV, PCM 16-bit, mono, 16 kHz",
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = WrittenDataset(out, per_class * len(classes), per_class * len(classes) * clip_seconds)
    log.info("wrote %d clips (%d windows) to %s", written.files, written.windows, out)
    return written


def pretrain_synthetic(
    base_dir: Path,
    *,
    seed: int = 0,
    per_class: int = DEFAULT_PER_CLASS,
    clip_seconds: int = DEFAULT_CLIP_SECONDS,
    epochs: int = 6,
) -> BaseModel:
    """Write the synthetic dataset beside ``base_dir`` and pretrain the base model on it."""
    from cloud_sidecar.pretrain import pretrain

    data = base_dir.with_name(f"{base_dir.name}-dataset")
    if data.exists():
        shutil.rmtree(data)
    write_dataset(data, per_class, seed, clip_seconds=clip_seconds)
    return pretrain(base_dir, data, seed=seed, epochs=epochs)
