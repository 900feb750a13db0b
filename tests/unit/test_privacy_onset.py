"""Onset safety of the privacy gate with words a real person said.

A single short word after seconds without speech, at the very start of a stream,
right after a capture restart and right after long loud noise must never end up in a
released window. The words (``tests/unit/data/real_words.npz``, README beside it) are
cut from a CMU Sphinx test recording; the city sounds come from ``devstack.scene``.
Leakage counts 10 ms frames of the word (conservative mask: above -45 dB re its
loudest frame) inside windows the gate released, with the gate's defaults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from devstack.scene import sounds
from edge_daemon.privacy.gate import GateConfig, PrivacyGate
from edge_daemon.privacy.vad import SileroVad

SR = 16_000
F32 = npt.NDArray[np.float32]
WORDS_FILE = Path(__file__).resolve().parent / "data" / "real_words.npz"


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(threads=1)


@pytest.fixture(scope="module")
def words() -> list[F32]:
    with np.load(WORDS_FILE) as z:
        return [np.asarray(z[k], dtype=np.float32) / 32768.0 for k in sorted(z.files)]


def _bed(kind: str, seconds: float, seed: int, dbfs: float) -> npt.NDArray[np.float64]:
    x = np.asarray(
        sounds.synthesize(kind, int(seconds * SR), np.random.default_rng(seed)), np.float64
    )
    return x * (10 ** (dbfs / 20) / max(1e-12, float(np.sqrt(np.mean(x * x)))))


def _place(
    bed: npt.NDArray[np.float64], word: F32, at_s: float, snr_db: float
) -> tuple[F32, npt.NDArray[np.bool_]]:
    """The bed with the word at ``at_s`` and ``snr_db`` over the bed under it; its
    10 ms speech frames."""
    a = int(at_s * SR)
    w = word.astype(np.float64)
    under = bed[a : a + w.size]
    level = float(np.sqrt(np.mean(w * w)))
    gain = max(float(np.sqrt(np.mean(under * under))), 10 ** (-50 / 20)) * 10 ** (snr_db / 20)
    mix = bed.copy()
    mix[a : a + w.size] += w * gain / level
    frames = np.zeros(bed.size // 160, dtype=np.bool_)
    rms = np.sqrt(np.mean(w[: w.size // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    on = np.flatnonzero(rms > rms.max() * 10 ** (-45 / 20))
    frames[a // 160 + on] = True
    frames[a // 160 + on + 1] = True  # the word starts on any sample: its frames straddle
    return mix.astype(np.float32), frames


def _leaked(gate: PrivacyGate, audio: F32, frames: npt.NDArray[np.bool_]) -> int:
    kept = []
    for i in range(0, audio.size, 1600):
        kept += gate.push(audio[i : i + 1600])
    kept += gate.flush()
    return int(sum(frames[k.index * 100 : (k.index + 1) * 100].sum() for k in kept))


@pytest.mark.parametrize("snr_db", [0.0, 10.0])
def test_a_single_word_after_seconds_of_street_noise_is_never_released(
    vad: SileroVad, words: list[F32], snr_db: float
) -> None:
    gate = PrivacyGate(GateConfig(), vad)
    for k, word in enumerate(words[:4]):
        bed = _bed("traffic", 14.0, 10 + k, -30.0)
        audio, frames = _place(bed, word, 7.3 + 0.11 * k, snr_db)
        assert _leaked(gate, audio, frames) == 0, f"word {k} leaked at {snr_db} dB"


def test_a_single_word_after_seconds_of_near_silence_is_never_released(
    vad: SileroVad, words: list[F32]
) -> None:
    gate = PrivacyGate(GateConfig(), vad)
    for k, word in enumerate(words[1:5]):
        bed = _bed("silence", 12.0, 20 + k, -60.0)
        audio, frames = _place(bed, word, 6.55 + 0.2 * k, 20.0)
        assert _leaked(gate, audio, frames) == 0, f"word {k} leaked after silence"


def test_a_word_at_the_very_start_of_a_stream_is_never_released(
    vad: SileroVad, words: list[F32]
) -> None:
    gate = PrivacyGate(GateConfig(), vad)
    for k, word in enumerate(words[:4]):
        bed = _bed("traffic", 6.0, 30 + k, -35.0)
        audio, frames = _place(bed, word, 0.02 + 0.05 * k, 10.0)
        assert _leaked(gate, audio, frames) == 0, f"word {k} at stream start leaked"


def test_a_word_right_after_a_capture_restart_is_never_released(
    vad: SileroVad, words: list[F32]
) -> None:
    """The first stream ends in loud noise mid-window; the restarted one opens on a word."""
    gate = PrivacyGate(GateConfig(), vad)
    for k, word in enumerate(words[1:5]):
        first = _bed("construction", 8.6, 40 + k, -20.0).astype(np.float32)
        assert _leaked(gate, first, np.zeros(first.size // 160, dtype=np.bool_)) == 0
        audio, frames = _place(_bed("traffic", 6.0, 50 + k, -35.0), word, 0.1, 5.0)
        assert _leaked(gate, audio, frames) == 0, f"word {k} after restart leaked"


def test_a_word_right_after_ten_seconds_of_loud_noise_is_never_released(
    vad: SileroVad, words: list[F32]
) -> None:
    gate = PrivacyGate(GateConfig(), vad)
    for k, word in enumerate(words[:3]):
        bed = _bed("traffic", 18.0, 60 + k, -35.0)
        bed[SR : 11 * SR] += _bed("construction", 10.0, 70 + k, -12.0)
        audio, frames = _place(bed, word, 11.2, 10.0)
        assert _leaked(gate, audio, frames) == 0, f"word {k} after loud noise leaked"
