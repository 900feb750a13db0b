"""Train and measure the sidecar's residual speech scanner on the synthetic city.

Owns the training data of ``cloud_sidecar.residual_scan``: speech windows (espeak-ng
sentences in the scene generator's EU languages, over a city background at 0-20 dB
SNR, random gain) and city-sound windows (``devstack.scene.windows``, every class,
silence included), both turned into the uploaded representation by
``fleet_protocol.features``. ``measure`` scores a fresh, differently seeded set:
recall on speech windows, false-flag rate on city windows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud_sidecar.residual_scan import SpeechScanner, fit_scanner
from devstack.scene.sounds import background
from devstack.scene.speech import LANGUAGES, speech_clip
from devstack.scene.windows import render_windows
from fleet_protocol.features import WINDOW_SAMPLES, features_batch
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
SNR_DB = (0.0, 20.0)


def speech_windows(n: int, rng: np.random.Generator) -> F32:
    """Audio of ``n`` 1-s windows, each mostly speech, mixed over a city background."""
    out = np.empty((n, WINDOW_SAMPLES), np.float32)
    i = 0
    while i < n:
        clip = speech_clip(LANGUAGES[int(rng.integers(len(LANGUAGES)))], rng)
        for start in range(0, len(clip) - WINDOW_SAMPLES + 1, WINDOW_SAMPLES):
            if i == n:
                break
            s = clip[start : start + WINDOW_SAMPLES].astype(np.float64)
            bed = background(WINDOW_SAMPLES, rng).astype(np.float64)
            snr = rng.uniform(*SNR_DB)
            ps, pb = np.mean(s**2) + 1e-12, np.mean(bed**2) + 1e-12
            mix = s + bed * np.sqrt(ps / (pb * 10 ** (snr / 10)))
            mix *= 10 ** (rng.uniform(-12.0, 0.0) / 20)
            out[i] = np.clip(mix, -1, 1)
            i += 1
    return out


def feature_sets(n: int, seed: int) -> tuple[F32, F32]:
    """(speech features, city features), ``n`` windows each, in the uploaded representation."""
    rng = np.random.default_rng(seed)
    speech = features_batch(speech_windows(n, rng))
    labels = [CLASSES[int(c)] for c in rng.integers(len(CLASSES), size=n)]
    city = features_batch(render_windows(labels, rng))
    as_uploaded = np.float16  # what the store keeps
    return speech.astype(as_uploaded).astype(np.float32), city.astype(as_uploaded).astype(
        np.float32
    )


def measure(scanner: SpeechScanner, n: int = 200, seed: int = 1001) -> dict[str, float]:
    speech, city = feature_sets(n, seed)
    return {
        "recall": round(float(scanner.flags(speech).mean()), 4),
        "false_flag": round(float(scanner.flags(city).mean()), 4),
        "n_speech": n,
        "n_city": n,
    }


def train_scanner(out: Path, n: int = 400, seed: int = 7) -> tuple[SpeechScanner, dict[str, float]]:
    """Train on ``n`` windows per side, save to ``out``, measure on a fresh set."""
    speech, city = feature_sets(n, seed)
    scanner = fit_scanner(speech, city)
    out.parent.mkdir(parents=True, exist_ok=True)
    scanner.save(out)
    figures = measure(scanner)
    log.info("speech scanner %s: %s", out, figures)
    return scanner, figures
