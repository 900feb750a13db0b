"""Data preparation on uploaded feature windows: exact and near-duplicate removal, the
quality filter, and the deterministic 80/10/10 split. Pure functions on arrays; no I/O.

Owns the rules a window must pass to enter a dataset. Invariants:
- every function is deterministic: the same windows and ids give the same result,
  whatever order they arrive in (ties go to the smallest ``(device, sample_id)`` key);
- nothing here knows the feature representation's shape or units: windows are
  ``(n, ...)`` float arrays, compared flattened; the one representation-specific
  number (the extractor's output on digital silence) is passed in by the caller;
- a sample's split is a function of its id alone (``split_of``): adding samples, or
  building another dataset version, never moves a sample between train, val and test.

Near-duplicates: two windows whose RMS difference (over all cells, in feature units)
is at most ``rms`` are the same sound uploaded twice (a device resending, two
devices hearing one source, a looped recording). Found with scipy's KD-tree
(``cKDTree.query_pairs``: exact, no false negatives) and grouped with
``scipy.sparse.csgraph.connected_components``; of each group the smallest key stays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

F32 = npt.NDArray[np.float32]
Key = tuple[str, str]  # (device_id, sample_id)

SPLITS = ("train", "val", "test")


def window_hash(window: npt.ArrayLike) -> str:
    """SHA-256 of a window's float16 little-endian bytes (how it is stored)."""
    return hashlib.sha256(np.ascontiguousarray(window, dtype="<f2").tobytes()).hexdigest()


def exact_duplicates(windows: F32, keys: Sequence[Key]) -> npt.NDArray[np.bool_]:
    """Mask of windows whose content equals an earlier-keyed window's."""
    first: dict[str, Key] = {}
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    dup = np.zeros(len(keys), dtype=bool)
    for i in order:
        h = window_hash(windows[i])
        if h in first:
            dup[i] = True
        else:
            first[h] = keys[i]
    return dup


def near_duplicates(windows: F32, keys: Sequence[Key], rms: float) -> npt.NDArray[np.bool_]:
    """Mask of windows within ``rms`` RMS difference of a smaller-keyed one (transitively)."""
    n = len(keys)
    dup = np.zeros(n, dtype=bool)
    if n < 2 or rms <= 0:
        return dup
    flat = np.asarray(windows, dtype=np.float64).reshape(n, -1)
    radius = rms * np.sqrt(flat.shape[1])
    pairs = cKDTree(flat).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return dup
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    keeper: dict[int, int] = {}
    for i in sorted(range(n), key=lambda i: keys[i]):
        c = int(component[i])
        if c in keeper:
            dup[i] = True
        else:
            keeper[c] = i
    return dup


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the quality filter, in feature units (see ``quality_reasons``)."""

    floor: float  # the extractor's output on digital silence (all-zero audio)
    dead_margin: float = 1e-3  # every cell within this of the floor: a dead input
    constant_std: float = 1e-3  # no cell varies more than this over time: a stuck input
    saturated_share: float = 0.5  # at least this share of cells at the window's maximum


def quality_reasons(windows: F32, rules: QualityRules) -> list[str]:
    """Per window: "" if usable, else why not (non_finite, dead, constant, saturated).

    ``dead`` is digital silence (a disconnected or muted microphone), not the quiet
    street the ``silence`` class describes: that has noise above the floor and passes.
    ``saturated``: most cells sit at the window's maximum, which clipped or overdriven
    input produces (a flat spectrum at full scale); ``constant``: the same frame
    repeated (a frozen capture buffer).
    """
    out: list[str] = []
    for w in np.asarray(windows, dtype=np.float32):
        if not np.isfinite(w).all():
            out.append("non_finite")
            continue
        if float(np.max(np.abs(w - rules.floor))) <= rules.dead_margin:
            out.append("dead")
            continue
        t = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1)
        # the same frame repeated, whichever axis is time in this representation
        if min(float(np.max(np.std(t, axis=a))) for a in (0, 1)) <= rules.constant_std:
            out.append("constant")
            continue
        top = float(np.max(w))
        if float(np.mean(w >= top - rules.dead_margin)) >= rules.saturated_share:
            out.append("saturated")
            continue
        out.append("")
    return out


def split_of(key: Key, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split of a sample: a function of its id only (SHA-256 of device/sample id).

    Stratification holds in expectation within every class and device (the hash is
    independent of both); the dataset manifest records the realised counts per class.
    """
    h = hashlib.sha256(f"{key[0]}/{key[1]}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"
