"""The residual speech scan: a speech detector on the uploaded features, run by the sidecar.

Independent of the device's gate: a different model (logistic regression on summary
statistics of the feature window) on a different input (the uploaded representation,
not audio), trained by the project on features of speech and of city sounds
(``devstack/speech_scan.py`` writes one), loaded from ``data.speech_scanner``. The
dataset build runs it on every labelled window: flagged windows are deleted from the
store, counted in the manifest and audited, and the build halts when the flagged
share exceeds ``data.max_residual_speech_rate`` (0.1 %): a gate that leaks that much is
a fault to investigate, not a data-cleaning step.

Invariants: shape-agnostic (any ``(bands, frames)`` window, bands first); the detector
file is an ``.npz`` without pickles, capped in size, and names the feature version it
was trained on: a detector for another representation is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from cloud_sidecar.errors import TrainingError
from fleet_protocol.features import FEATURE_VERSION

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
MAX_SCANNER_BYTES = 1024 * 1024
N_MOD = 8  # bins of the frame-energy modulation spectrum


def summary(windows: F32) -> F64:
    """Per window: per-band mean, std and mean |frame-to-frame change|, and the
    normalised modulation spectrum of the window's energy trajectory (speech: syllables
    at ~2-8 Hz, pauses between words)."""
    x = np.asarray(windows, dtype=np.float64)
    x = x.reshape(len(x), x.shape[1], -1)
    mean, std = x.mean(axis=2), x.std(axis=2)
    delta = np.abs(np.diff(x, axis=2)).mean(axis=2)
    energy = x.mean(axis=1)
    energy = energy - energy.mean(axis=1, keepdims=True)
    spec = np.abs(np.fft.rfft(energy, axis=1))[:, 1:]
    if spec.shape[1] >= N_MOD:
        bins = np.array_split(spec, N_MOD, axis=1)
        mod = np.stack([b.mean(axis=1) for b in bins], axis=1)
    else:  # few frames per window (e.g. 120 ms frames): every bin, zero-padded
        mod = np.pad(spec, ((0, 0), (0, N_MOD - spec.shape[1])))
    mod = mod / (mod.sum(axis=1, keepdims=True) + 1e-9)
    frac_high = (x.mean(axis=1) > np.median(x.mean(axis=1), axis=1, keepdims=True) + 0.25).mean(
        axis=1, keepdims=True
    )
    return np.concatenate([mean, std, delta, mod, frac_high], axis=1)


@dataclass(frozen=True)
class SpeechScanner:
    weights: F64
    bias: float
    mu: F64
    sd: F64
    threshold: float
    feature_version: str = FEATURE_VERSION

    def scores(self, windows: F32) -> F64:
        if len(windows) == 0:
            return np.zeros(0)
        z = (summary(windows) - self.mu) / self.sd
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z @ self.weights + self.bias, -50, 50))))

    def flags(self, windows: F32) -> npt.NDArray[np.bool_]:
        return self.scores(windows) >= self.threshold

    def save(self, path: Path) -> None:
        np.savez(
            path,
            weights=self.weights,
            bias=np.array(self.bias),
            mu=self.mu,
            sd=self.sd,
            threshold=np.array(self.threshold),
            feature_version=np.array(self.feature_version),
        )


def load_scanner(path: Path) -> SpeechScanner:
    if path.stat().st_size > MAX_SCANNER_BYTES:
        raise TrainingError(f"{path} exceeds {MAX_SCANNER_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as z:
            s = SpeechScanner(
                z["weights"].astype(np.float64),
                float(z["bias"]),
                z["mu"].astype(np.float64),
                z["sd"].astype(np.float64),
                float(z["threshold"]),
                str(z["feature_version"]),
            )
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"{path} is not a speech scanner: {e}") from e
    if s.feature_version != FEATURE_VERSION:
        raise TrainingError(
            f"{path} was trained on {s.feature_version} features, uploads are {FEATURE_VERSION}"
        )
    return s


def fit_scanner(
    speech: F32, other: F32, *, target_recall: float = 0.95, l2: float = 1e-2
) -> SpeechScanner:
    """Logistic regression (L-BFGS, L2) on ``summary``; threshold at ``target_recall``
    of the speech windows given (pass held-out windows to ``scores`` to measure)."""
    f = np.concatenate([summary(speech), summary(other)])
    y = np.concatenate([np.ones(len(speech)), np.zeros(len(other))])
    mu, sd = f.mean(axis=0), f.std(axis=0) + 1e-6
    z = (f - mu) / sd
    w_pos = 0.5 / max(1, len(speech))
    w_neg = 0.5 / max(1, len(other))
    sample_w = np.where(y == 1, w_pos, w_neg)

    def loss(theta: F64) -> tuple[float, F64]:
        w, b = theta[:-1], theta[-1]
        logits = z @ w + b
        p = 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
        eps = 1e-12
        value = -np.sum(sample_w * (y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        value += 0.5 * l2 * float(w @ w)
        g = sample_w * (p - y)
        grad = np.concatenate([z.T @ g + l2 * w, [g.sum()]])
        return float(value), grad

    res = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B")
    scanner = SpeechScanner(res.x[:-1], float(res.x[-1]), mu, sd, 0.5)
    s = scanner.scores(speech)
    threshold = float(np.quantile(s, 1.0 - target_recall)) if len(s) else 0.5
    return SpeechScanner(res.x[:-1], float(res.x[-1]), mu, sd, threshold)
