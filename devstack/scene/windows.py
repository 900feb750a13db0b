"""Labelled 1-s windows of the synthetic city: events over a background bed, at random SNR.

Owns ``render_windows`` (audio) and ``build_training_set`` (upload features of them),
the synthetic city's own recipe for labelled training windows. Moved here from the
sidecar: production code never renders data, it reads a dataset (``cloud-sidecar
pretrain --dataset``), and ``devstack.dataset`` writes these windows as one.
Invariants:

- every window is ``WINDOW_SAMPLES`` of float32 mono at 16 kHz, clipped to [-1, 1];
- a non-silence event sits ``SNR_DB`` over the bed, then the mix gets a gain in
  ``GAIN_DB`` (microphone sensitivity, distance); silence is the bed alone from
  inaudible up to the city level;
- everything is drawn from the ``rng`` passed in: a seed reproduces the windows.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from devstack.scene.sounds import background, synthesize
from fleet_protocol.features import N_BANDS, N_FRAMES, WINDOW_SAMPLES, features_batch
from fleet_protocol.labels import CLASS_INDEX, CLASSES

log = logging.getLogger(__name__)

SNR_DB = (6.0, 35.0)  # event over background
GAIN_DB = (-6.0, 6.0)  # overall gain after mixing (microphone sensitivity, distance)
MAX_PER_CLASS = 100_000
FEATURE_CHUNK = 128  # windows rendered and featurised at a time


def render_windows(
    labels: list[str],
    rng: np.random.Generator,
    *,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    hilo_pairs: tuple[tuple[float, float], ...] = ((440.0, 587.0),),
) -> npt.NDArray[np.float32]:
    """1 s audio windows, one per label: the event mixed with background at random SNR/gain."""
    out = np.empty((len(labels), WINDOW_SAMPLES), dtype=np.float32)
    for i, label in enumerate(labels):
        pattern = str(rng.choice(list(siren_patterns)))
        pair = hilo_pairs[int(rng.integers(len(hilo_pairs)))]
        event = synthesize(label, WINDOW_SAMPLES, rng, siren_pattern=pattern, hilo_hz=pair)
        bed = background(WINDOW_SAMPLES, rng).astype(np.float64)
        if label == "silence":
            bed_gain = 10.0 ** (rng.uniform(-40.0, 0.0) / 20.0)  # from inaudible to the city bed
        else:
            ev_rms = float(np.sqrt(np.mean(event.astype(np.float64) ** 2)))
            bed_rms = float(np.sqrt(np.mean(bed**2))) + 1e-12
            bed_gain = ev_rms / bed_rms / 10.0 ** (rng.uniform(*SNR_DB) / 20.0)
        mix = (event + bed_gain * bed) * 10.0 ** (rng.uniform(*GAIN_DB) / 20.0)
        out[i] = np.clip(mix, -1.0, 1.0)
    return out


def build_training_set(
    rng: np.random.Generator,
    n_per_class: int,
    siren_patterns: tuple[str, ...] = ("wail", "yelp"),
    *,
    classes: tuple[str, ...] = CLASSES,
    hilo_pairs: tuple[tuple[float, float], ...] = ((440.0, 587.0),),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n_per_class`` windows of each class in ``classes``, shuffled.

    Returns features ``(N, 20, 8)`` float32 and labels ``(N,)`` int64 (indices into
    ``CLASSES``). Sirens use a pattern drawn from ``siren_patterns``.
    """
    if not 0 < n_per_class <= MAX_PER_CLASS:
        raise ValueError(f"n_per_class must be in 1..{MAX_PER_CLASS}, got {n_per_class}")
    names = [c for c in classes for _ in range(n_per_class)]
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    feats = np.empty((len(names), N_BANDS, N_FRAMES), dtype=np.float32)
    for i in range(0, len(names), FEATURE_CHUNK):  # bounded memory: audio never all at once
        chunk = names[i : i + FEATURE_CHUNK]
        audio = render_windows(chunk, rng, siren_patterns=siren_patterns, hilo_pairs=hilo_pairs)
        feats[i : i + len(chunk)] = features_batch(audio)
    labels = np.array([CLASS_INDEX[c] for c in names], dtype=np.int64)
    log.debug("built %d windows of %d classes", len(names), len(classes))
    return feats, labels
