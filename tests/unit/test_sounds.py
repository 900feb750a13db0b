"""The scene generator's sound recipes: format, levels, determinism and acoustic shape."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstack.scene.sounds import SIREN_PATTERNS, background, synthesize
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES

N = SAMPLE_RATE
EVENTS = tuple(c for c in CLASSES if c != "silence")


def _dbfs(x: npt.NDArray[np.float32]) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12))


def _band_fraction(x: npt.NDArray[np.float32], lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(spec[(f >= lo) & (f < hi)].sum() / spec.sum())


def _peak_track(x: npt.NDArray[np.float32], frame: int = 800) -> npt.NDArray[np.float64]:
    """Dominant frequency per 50 ms frame (Hann window, zero-padded for resolution)."""
    frames = x[: len(x) // frame * frame].reshape(-1, frame).astype(np.float64)
    spec = np.abs(np.fft.rfft(frames * np.hanning(frame), n=8 * frame, axis=1))
    freqs = np.fft.rfftfreq(8 * frame, 1 / SAMPLE_RATE)
    return np.asarray(freqs[spec.argmax(axis=1)], dtype=np.float64)


@pytest.mark.parametrize("label", CLASSES)
def test_every_label_renders_float32_mono_with_peak_at_most_one(label: str) -> None:
    for seed in range(5):
        x = synthesize(label, N, np.random.default_rng(seed))
        assert x.dtype == np.float32 and x.shape == (N,)
        assert np.isfinite(x).all() and float(np.abs(x).max()) <= 1.0


@pytest.mark.parametrize("label", EVENTS)
def test_event_levels_stay_within_minus_30_to_minus_6_dbfs_unless_peak_limited(label: str) -> None:
    levels = [_dbfs(synthesize(label, N, np.random.default_rng(s))) for s in range(12)]
    assert max(levels) <= -6.0 + 1e-3
    assert min(levels) >= -45.0  # peak limiting may pull a spiky event below -30
    assert max(levels) - min(levels) > 3.0  # levels are randomised


def test_silence_is_far_below_events_and_background_is_a_low_bed() -> None:
    rng = np.random.default_rng(0)
    assert all(_dbfs(synthesize("silence", N, rng)) <= -59.0 for _ in range(10))
    assert all(-50.5 <= _dbfs(background(N, rng)) <= -37.5 for _ in range(10))


@pytest.mark.parametrize("label", CLASSES)
def test_same_seed_gives_identical_audio_and_another_seed_differs(label: str) -> None:
    a = synthesize(label, N, np.random.default_rng(42), siren_pattern="hilo")
    b = synthesize(label, N, np.random.default_rng(42), siren_pattern="hilo")
    c = synthesize(label, N, np.random.default_rng(43), siren_pattern="hilo")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("hilo_hz", [(440.0, 587.0), (435.0, 580.0), (392.0, 523.0)])
def test_hilo_siren_alternates_between_its_two_tones(hilo_hz: tuple[float, float]) -> None:
    for seed in range(4):
        x = synthesize(
            "siren", N, np.random.default_rng(seed), siren_pattern="hilo", hilo_hz=hilo_hz
        )
        track = _peak_track(x)
        near = [np.abs(track / f - 1.0) < 0.04 for f in hilo_hz]
        assert (near[0] | near[1]).mean() >= 0.8  # steady tones at the two pitches
        assert near[0].any() and near[1].any()  # a 1 s window always holds a switch


def test_wail_and_yelp_sweep_within_the_siren_band() -> None:
    for seed in range(4):
        wail = _peak_track(synthesize("siren", N, np.random.default_rng(seed)))
        assert 550.0 <= np.median(wail) <= 1550.0
        yelp = _peak_track(
            synthesize("siren", N, np.random.default_rng(seed), siren_pattern="yelp")
        )
        assert np.percentile(yelp, 90) - np.percentile(yelp, 10) > 250.0  # fast sweep


def test_horn_has_a_fundamental_in_the_horn_band_close_to_hilo() -> None:
    for seed in range(6):
        x = synthesize("horn", N, np.random.default_rng(seed))
        track = _peak_track(x)
        loud = np.abs(x[: len(track) * 800].reshape(len(track), -1)).max(axis=1) > 0.05
        lowest = np.min(track[loud])
        assert 330.0 <= lowest <= 650.0


def test_construction_hits_repeat_at_10_to_25_hz() -> None:
    for seed in range(4):
        x = synthesize("construction", N, np.random.default_rng(seed)).astype(np.float64)
        env = np.abs(x).reshape(-1, 80).max(axis=1)  # 5 ms envelope
        env = env - env.mean()
        ac = np.correlate(env, env, mode="full")[len(env) - 1 :]
        lag = int(np.argmax(ac[8:21])) + 8  # 40..100 ms periods = 25..10 Hz
        assert ac[lag] > 0.3 * ac[0]


def test_spectral_balance_matches_each_sound() -> None:
    rng = np.random.default_rng(5)
    for _ in range(4):
        assert _band_fraction(synthesize("engine", N, rng), 0, 1000) > 0.8
        assert _band_fraction(synthesize("wind", N, rng), 0, 1000) > 0.8
        assert _band_fraction(synthesize("rain", N, rng), 1500, 8000) > 0.6
        assert _band_fraction(synthesize("glass_break", N, rng), 1000, 8000) > 0.6
        assert _band_fraction(synthesize("dog_bark", N, rng), 500, 4000) > 0.6


def test_unknown_label_pattern_or_length_is_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synthesize("tram", N, rng)
    with pytest.raises(ValueError):
        synthesize("siren", N, rng, siren_pattern="whoop")
    with pytest.raises(ValueError):
        synthesize("rain", 0, rng)
    with pytest.raises(ValueError):
        background(SAMPLE_RATE * 3600, rng)
    assert set(SIREN_PATTERNS) == {"wail", "yelp", "hilo"}


@settings(max_examples=40, deadline=None)
@given(
    label=st.sampled_from(CLASSES),
    pattern=st.sampled_from(SIREN_PATTERNS),
    n=st.integers(min_value=1, max_value=3 * SAMPLE_RATE),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_length_and_seed_gives_bounded_finite_audio(
    label: str, pattern: str, n: int, seed: int
) -> None:
    x = synthesize(label, n, np.random.default_rng(seed), siren_pattern=pattern)
    assert x.shape == (n,) and x.dtype == np.float32
    assert np.isfinite(x).all() and float(np.abs(x).max()) <= 1.0
