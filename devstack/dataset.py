"""The synthetic city as a pretraining dataset: WAV files in the layout an operator's set uses.

Owns ``write_dataset`` (``devstack write-dataset``): ``per_class`` clips of every class
of ``fleet_protocol.labels.CLASSES``, written as ``OUT/<class>/<class>-NNNN.wav``
(16-bit PCM, mono, 16 kHz), plus ``OUT/dataset.json`` saying how they were made: the
folder-per-class layout that ``cloud-sidecar pretrain --dataset`` reads
(``docs/datasets.md``). Invariants:

- a clip is one event segment cut out of a scene stream rendered by
  ``devstack.scene.stream.render_scene``, the generator of the benchmark's and the
  demo's scenes: 1-4 s events of one class on the 1-s grid over one continuous
  background bed, at the scene's levels, labelled by the scene's rule (a window
  carries the event under it, even where that event is quiet for part of it); so
  pretraining sees windows made the way a device's scene makes them (issue 12: the
  old per-window recipe scored 0.41 macro-F1 on the bench scene);
- never the benchmark's or the demo's scenes themselves: stream ``k`` of dataset seed
  ``s`` has scene seed ``STREAM_SEED_BASE + s * STREAM_SEEDS_PER_SET + k``, far from
  the seeds those use (42.., 1000..), no speech, and sirens drawn from
  ``siren_patterns`` (``wail``/``yelp``: the two-tone ``hilo`` the demo's adapter
  teaches is left out on purpose); class weights are uniform over ``classes``;
- each clip gets a gain in ``CLIP_GAIN_DB`` (event and bed alike): the levels the
  benchmark's and the demo's scenes end up at (see the constant);
- streams last ``STREAM_SECONDS`` in turn (the bed of a longer stream is quieter in
  the audible bands, and devices' scenes come in 60 s to 10 min chunks);
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from devstack.errors import DevstackError
from devstack.scene.stream import SceneSpec, render_scene
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES

if TYPE_CHECKING:
    from cloud_sidecar.pretrain import BaseModel

log = logging.getLogger(__name__)

DEFAULT_PER_CLASS = 80  # event segments of 1-4 s: ~200 windows per class, ~2,000 in all
MAX_PER_CLASS = 10_000
STREAM_SECONDS = (60, 120, 300, 600)
STREAM_SEED_BASE = 1_000_000
STREAM_SEEDS_PER_SET = 100_000
# Each clip's gain (event and bed alike, so its SNR stays): a scene is scaled down as a
# whole where speech over a loud event would clip (render_scene's peak rule), by 19-31 dB
# in the benchmark's 10-min chunks and 14-25 dB in the demo's; and microphones differ.
CLIP_GAIN_DB = (-36.0, 0.0)
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


def stream_spec(
    seed: int, k: int, siren_patterns: tuple[str, ...], classes: tuple[str, ...]
) -> SceneSpec:
    """The ``k``-th scene stream of dataset seed ``seed`` (module invariants)."""
    return SceneSpec(
        seed=STREAM_SEED_BASE + seed * STREAM_SEEDS_PER_SET + k,
        duration_s=STREAM_SECONDS[k % len(STREAM_SECONDS)],
        siren_pattern=siren_patterns[k % len(siren_patterns)],
        class_weights=tuple((c, 1.0) for c in classes),
        speech_rate=0.0,
    )


def scene_segments(
    seed: int, siren_patterns: tuple[str, ...], classes: tuple[str, ...]
) -> Iterator[tuple[str, np.ndarray]]:
    """(label, audio) of every run of equal window labels of streams 0, 1, ... for ever."""
    for k in range(STREAM_SEEDS_PER_SET):
        scene = render_scene(stream_spec(seed, k, siren_patterns, classes))
        labels = scene.window_labels
        i = 0
        while i < len(labels):
            j = i
            while j + 1 < len(labels) and labels[j + 1] == labels[i]:
                j += 1
            yield labels[i], scene.audio[i * SAMPLE_RATE : (j + 1) * SAMPLE_RATE]
            i = j + 1
    raise DevstackError(f"{STREAM_SEEDS_PER_SET} streams did not fill the dataset")


def write_dataset(
    out: Path,
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
    *,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    classes: tuple[str, ...] = CLASSES,
) -> WrittenDataset:
    """Write the synthetic city as a folder-per-class dataset at ``out``."""
    if not 0 < per_class <= MAX_PER_CLASS:
        raise DevstackError(f"per_class must be in 1..{MAX_PER_CLASS}, got {per_class}")
    if not classes or not set(classes) <= set(CLASSES) or not siren_patterns:
        raise DevstackError(f"classes must be a non-empty subset of {CLASSES}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DevstackError(f"{out} exists and is not an empty directory; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    written = dict.fromkeys(classes, 0)
    windows = 0
    gains = np.random.default_rng(seed)
    try:
        for cls in classes:
            (tmp / cls).mkdir()
        for label, audio in scene_segments(seed, siren_patterns, classes):
            k = written[label]
            if k >= per_class:
                if min(written.values()) >= per_class:
                    break
                continue
            gain = 10.0 ** (gains.uniform(*CLIP_GAIN_DB) / 20.0)
            (tmp / label / f"{label}-{k:04d}.wav").write_bytes(_wav_bytes(audio * gain))
            written[label] = k + 1
            windows += len(audio) // SAMPLE_RATE
        info = {
            "generator": "devstack.dataset.write_dataset (devstack.scene.stream.render_scene)",
            "layout": "folders",
            "seed": seed,
            "per_class": per_class,
            "clips": "one event segment (1-4 s of one class) of a scene stream, bed included",
            "stream_seeds": f"{STREAM_SEED_BASE} + seed * {STREAM_SEEDS_PER_SET} + k",
            "stream_seconds": list(STREAM_SECONDS),
            "speech": "none",
            "clip_gain_db": list(CLIP_GAIN_DB),
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
    result = WrittenDataset(out, per_class * len(classes), windows)
    log.info("wrote %d clips (%d windows) to %s", result.files, result.windows, out)
    return result


def pretrain_synthetic(
    base_dir: Path,
    *,
    seed: int = 0,
    per_class: int = DEFAULT_PER_CLASS,
    epochs: int = 6,
) -> BaseModel:
    """Write the synthetic dataset beside ``base_dir`` and pretrain the base model on it."""
    from cloud_sidecar.pretrain import pretrain

    data = base_dir.with_name(f"{base_dir.name}-dataset")
    if data.exists():
        shutil.rmtree(data)
    write_dataset(data, per_class, seed)
    return pretrain(base_dir, data, seed=seed, epochs=epochs)
