"""The speech check's augmented training windows (``benchmarks.speech_check_data``):
labels follow the bench's ground truth, lookalikes are never speech, draws repeat."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import speech_check_data as scd
from benchmarks.privacy_real import room

SR = 16_000


def _tone_word(f0: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    env = np.sin(np.pi * t / seconds) ** 2
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * env
    return np.asarray(0.3 * x, dtype=np.float32)


@pytest.fixture(scope="module")
def banks() -> scd.Banks:
    rng = np.random.default_rng(0)
    words = tuple(_tone_word(f, s) for f, s in ((120, 0.3), (180, 0.5), (220, 0.8)))
    bed = rng.standard_normal(20 * SR) * 0.01
    return scd.Banks(
        words=words,
        pieces=(np.concatenate(words),),
        radio=(_tone_word(300, 1.0),),
        lookalike=(_tone_word(440, 0.7),),
        beds=(bed,),
        rirs=(room(rng, rt60=1.5, drr_db=-6.0),),
    )


def test_draws_repeat_for_a_seed_and_differ_across_seeds(banks: scd.Banks) -> None:
    a, fa, ka = scd.draw(banks, 40, seed=3)
    b, fb, kb = scd.draw(banks, 40, seed=3)
    c, _, _ = scd.draw(banks, 40, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert ka == kb
    assert not np.array_equal(a, c)


def test_lookalike_and_empty_windows_hold_no_speech_frames(banks: scd.Banks) -> None:
    _, frames, kinds = scd.draw(banks, 300, seed=5)
    quiet = [k.split("+")[0] in ("lookalike", "none") for k in kinds]
    assert any(quiet)
    assert not frames[np.array(quiet)].any()


def test_speech_windows_are_labelled_with_the_frames_they_hold(banks: scd.Banks) -> None:
    x, frames, kinds = scd.draw(banks, 300, seed=6)
    spoken = np.array([k.split("+")[0] in ("word", "burst", "piece", "radio", "pa") for k in kinds])
    assert spoken.sum() > 150
    assert (frames[spoken] > 0).mean() > 0.9  # an edge may leave only a silent tail inside
    assert frames.max() <= 100
    assert x.shape == (300, SR) and np.abs(x).max() <= 0.99
    assert any(k.endswith("+room") for k in kinds) and any("+" not in k for k in kinds)
