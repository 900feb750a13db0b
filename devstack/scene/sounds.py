"""Synthetic city sound events, one labelled window at a time.

Owns the procedural recipes for every label in ``fleet_protocol.labels.CLASSES`` and for
the city background bed. Invariants:

- output is float32 mono at ``SAMPLE_RATE`` (16 kHz), ``n_samples`` long, peak <= 1;
- event levels are drawn in -30..-6 dBFS RMS (silence and the background are far lower);
- every parameter (level, pitch, timing, phase, Doppler) comes from the ``rng`` passed in,
  so a seed reproduces the same audio bit for bit, and two draws differ;
- ``siren_pattern`` selects a national siren pattern: ``wail`` and ``yelp`` sweep,
  ``hilo`` alternates two steady tones at ``hilo_hz`` (European two-tone); its tones sit
  close to a car horn's chord on purpose, so a model that never saw ``hilo`` confuses them.

Pure numpy plus ``scipy.signal`` filters; no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from scipy import signal

from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES

log = logging.getLogger(__name__)

SIREN_PATTERNS = ("wail", "yelp", "hilo")
EVENT_DBFS = (-30.0, -6.0)
SILENCE_DBFS = (-75.0, -60.0)
BACKGROUND_DBFS = (-50.0, -38.0)
MAX_SAMPLES = SAMPLE_RATE * 600  # 10 minutes: a cap on what one call may allocate

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
SR = float(SAMPLE_RATE)


# --------------------------------------------------------------------------- helpers


def _t(n: int) -> F64:
    return np.arange(n, dtype=np.float64) / SR


def _rms_to(x: F64, dbfs: float) -> F64:
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    if rms <= 0.0:
        return x
    return np.asarray(x * (10.0 ** (dbfs / 20.0) / rms), dtype=np.float64)


def _finish(x: F64, dbfs: float) -> F32:
    y = _rms_to(x, dbfs)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 0.99:
        y = y * (0.99 / peak)
    return y.astype(np.float32)


def _colored_noise(n: int, rng: np.random.Generator, exponent: float) -> F64:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.fft.rfftfreq(n, 1.0 / SR)
    f[0] = f[1] if n > 1 else 1.0
    spec *= f ** (-exponent / 2.0)
    x = np.fft.irfft(spec, n=n)
    return np.asarray(x / (np.std(x) + 1e-12), dtype=np.float64)


def _smooth_env(n: int, rng: np.random.Generator, rate_hz: float, lo: float, hi: float) -> F64:
    """A slowly varying random envelope in [lo, hi] with about ``rate_hz`` control points/s."""
    n_pts = max(2, int(np.ceil(n / SR * rate_hz)) + 2)
    pts = rng.uniform(lo, hi, n_pts)
    xp = np.linspace(0.0, n, n_pts)
    return np.asarray(np.interp(np.arange(n, dtype=np.float64), xp, pts), dtype=np.float64)


def _butter(x: F64, kind: str, hz: float | tuple[float, float], order: int = 4) -> F64:
    sos = signal.butter(order, hz, btype=kind, fs=SR, output="sos")
    return np.asarray(signal.sosfilt(sos, x), dtype=np.float64)


def _harmonic(phase: F64, n_harm: int, rolloff: float, rng: np.random.Generator) -> F64:
    """Sum of ``n_harm`` harmonics of ``phase`` with amplitude k**-rolloff and random phases."""
    out = np.zeros_like(phase)
    for k in range(1, n_harm + 1):
        out += k ** (-rolloff) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _phase(freq: F64) -> F64:
    return 2.0 * np.pi * np.cumsum(freq) / SR


def _doppler(n: int, rng: np.random.Generator) -> F64:
    """A slight frequency factor sweeping through 1 (a passing vehicle), up to +-2 %."""
    d = rng.uniform(0.0, 0.02)
    centre = rng.uniform(-0.5, 1.5) * n
    width = rng.uniform(0.3, 1.5) * SR
    factor = 1.0 + d * np.tanh(-(np.arange(n, dtype=np.float64) - centre) / width)
    return np.asarray(factor, dtype=np.float64)


def _burst_env(n: int, start: int, length: int, attack: int, release: int) -> F64:
    env = np.zeros(n, dtype=np.float64)
    end = min(n, start + length)
    if end <= max(start, 0):
        return env
    seg = np.ones(end - start)
    a = min(attack, seg.size)
    r = min(release, seg.size)
    if a > 0:
        seg[:a] = np.linspace(0.0, 1.0, a)
    if r > 0:
        seg[-r:] = np.minimum(seg[-r:], np.linspace(1.0, 0.0, r))
    env[max(0, start) : end] = seg[max(0, -start) :]
    return env


# --------------------------------------------------------------------------- recipes


def _silence(n: int, rng: np.random.Generator) -> F32:
    x = _colored_noise(n, rng, rng.uniform(0.0, 1.0))
    return _finish(x, rng.uniform(*SILENCE_DBFS))


def _traffic(n: int, rng: np.random.Generator) -> F64:
    x = _colored_noise(n, rng, rng.uniform(1.0, 2.0))
    x = _butter(x, "lowpass", rng.uniform(1500.0, 4000.0), order=2)
    # Slow swells as vehicles pass, plus a faint tyre hiss band.
    swell = _smooth_env(n, rng, rng.uniform(1.0, 3.0), 0.4, 1.0)
    hiss = _butter(rng.standard_normal(n), "bandpass", (800.0, 3000.0), order=2)
    return x * swell + rng.uniform(0.02, 0.1) * hiss * swell


def _engine(n: int, rng: np.random.Generator) -> F64:
    t = _t(n)
    f0 = rng.uniform(30.0, 120.0) * (1.0 + rng.uniform(-0.05, 0.05) * t)  # slight rev change
    tone = _harmonic(_phase(f0), int(rng.integers(5, 12)), rng.uniform(0.5, 1.2), rng)
    am_rate = rng.uniform(2.0, 9.0)
    am = 1.0 + rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi))
    rumble = _butter(rng.standard_normal(n), "lowpass", rng.uniform(200.0, 600.0), order=2)
    return tone * am + rng.uniform(0.1, 0.5) * rumble * am


def _siren(n: int, rng: np.random.Generator, pattern: str, hilo_hz: tuple[float, float]) -> F64:
    t = _t(n)
    if pattern == "wail":
        lo, hi = rng.uniform(620.0, 720.0), rng.uniform(1250.0, 1450.0)
        rate = rng.uniform(0.2, 0.3)
        sweep = 0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
        freq = lo + (hi - lo) * sweep
    elif pattern == "yelp":
        lo, hi = rng.uniform(650.0, 800.0), rng.uniform(1250.0, 1500.0)
        rate = rng.uniform(3.0, 5.0)
        # Fast up-and-down sweep, rising longer than falling; the pitch never jumps.
        rise = rng.uniform(0.55, 0.8)
        u = (rate * t + rng.uniform(0.0, 1.0)) % 1.0
        tri = np.where(u < rise, u / rise, (1.0 - u) / (1.0 - rise))
        freq = lo + (hi - lo) * np.sin(0.5 * np.pi * tri)
    elif pattern == "hilo":
        seg = rng.uniform(0.4, 0.6) * SR
        offset = rng.uniform(0.0, 2.0 * seg)
        which = ((np.arange(n) + offset) // seg).astype(np.int64) % 2
        jitter = rng.uniform(0.99, 1.01)
        f_lo, f_hi = hilo_hz
        step = np.where(which == 0, f_lo, f_hi) * jitter
        # Smooth the switch over ~5 ms so the phase stays continuous without clicks.
        k = max(1, int(0.005 * SR))
        freq = np.convolve(np.pad(step, (k, k), mode="edge"), np.ones(k) / k, mode="same")[k:-k]
    else:
        raise ValueError(f"unknown siren pattern {pattern!r}; expected one of {SIREN_PATTERNS}")
    freq = freq * _doppler(n, rng)
    if pattern == "hilo":
        # Two-tone sirens descend from compressed-air horns: a bright, horn-like timbre.
        tone = _harmonic(_phase(freq), int(rng.integers(5, 10)), rng.uniform(0.7, 1.3), rng)
    else:  # electronic sweeps: few, quickly falling harmonics
        tone = _harmonic(_phase(freq), int(rng.integers(2, 5)), rng.uniform(1.0, 2.0), rng)
    # Some reverberant smear and a little road noise under it.
    noise = _butter(rng.standard_normal(n), "lowpass", 2000.0, order=2)
    return tone + rng.uniform(0.01, 0.08) * noise


def _horn_chord(n: int, rng: np.random.Generator) -> F64:
    f1 = rng.uniform(350.0, 450.0)
    nh = int(rng.integers(5, 10))
    roll = rng.uniform(0.7, 1.3)
    doppler = _doppler(n, rng)
    chord = _harmonic(_phase(f1 * doppler), nh, roll, rng)
    if rng.random() < 0.7:  # dual horns: a third to a fourth above; else a single horn
        chord += _harmonic(_phase(f1 * rng.uniform(1.2, 1.34) * doppler), nh, roll, rng)
    return chord


def _horn(n: int, rng: np.random.Generator) -> F64:
    attack, release = int(0.01 * SR), int(0.03 * SR)
    chord = _horn_chord(n, rng)
    if rng.random() < 0.25:  # one long press through the whole window
        return chord * _burst_env(n, int(rng.uniform(-0.2, 0.0) * n), 2 * n, attack, release)
    # Blasts in a row; a later one may come from another car (another pitch), even
    # overlapping the previous one (a negative gap).
    out = np.zeros(n)
    pos = int(rng.uniform(-0.3, 0.4) * SR)
    while pos < n:
        length = int(rng.uniform(0.15, 0.7) * SR)
        out += chord * _burst_env(n, pos, length, attack, release)
        pos += length + int(rng.uniform(-0.1, 0.3) * SR)
        if rng.random() < 0.5:
            chord = _horn_chord(n, rng)
    return out


def _glass_break(n: int, rng: np.random.Generator) -> F64:
    t = _t(n)
    t0 = rng.uniform(0.02, 0.5) * n / SR
    dt = t - t0
    on = dt >= 0
    crash = rng.standard_normal(n) * np.exp(-np.clip(dt, 0, None) / rng.uniform(0.01, 0.04)) * on
    crash = _butter(crash, "highpass", rng.uniform(1000.0, 2500.0), order=2)
    partials = np.zeros(n)
    for _ in range(int(rng.integers(5, 12))):
        f = rng.uniform(2000.0, 7500.0)
        tau = rng.uniform(0.03, 0.3)
        delay = rng.uniform(0.0, 0.15)
        d = dt - delay
        partials += (
            rng.uniform(0.2, 1.0)
            * np.sin(2 * np.pi * f * d + rng.uniform(0, 2 * np.pi))
            * np.exp(-np.clip(d, 0, None) / tau)
            * (d >= 0)
        )
    # Falling shards: a few later tinkles.
    tinkles = np.zeros(n)
    for _ in range(int(rng.integers(2, 8))):
        s = int((t0 + rng.uniform(0.1, 0.5)) * SR)
        if s >= n:
            continue
        ln = min(n - s, int(0.04 * SR))
        tt = np.arange(ln) / SR
        tinkles[s : s + ln] += (
            rng.uniform(0.05, 0.3)
            * np.sin(2 * np.pi * rng.uniform(3000.0, 7000.0) * tt)
            * np.exp(-tt / 0.008)
        )
    return 2.0 * crash + 0.5 * partials + tinkles


def _construction(n: int, rng: np.random.Generator) -> F64:
    rate = rng.uniform(10.0, 25.0)
    period = SR / rate
    start = rng.uniform(0.0, period)
    impulses = np.zeros(n)
    pos = np.arange(start, n, period)
    pos = pos + rng.normal(0.0, 0.02 * period, pos.size)
    pos = pos[(pos >= 0) & (pos < n)].astype(np.int64)
    impulses[pos] = rng.uniform(0.6, 1.0, pos.size)
    # Pauses: the operator lifts the tool now and then.
    if rng.random() < 0.5:
        gap_start = int(rng.uniform(0.2, 0.8) * n)
        impulses[gap_start : gap_start + int(rng.uniform(0.05, 0.25) * SR)] = 0.0
    klen = int(0.03 * SR)
    kt = np.arange(klen) / SR
    f_res = rng.uniform(300.0, 1500.0)
    kernel = rng.standard_normal(klen) * np.exp(-kt / 0.004) + 0.8 * np.sin(
        2 * np.pi * f_res * kt
    ) * np.exp(-kt / rng.uniform(0.005, 0.015))
    hits = np.convolve(impulses, kernel)[:n]
    motor = _butter(rng.standard_normal(n), "lowpass", 300.0, order=2)
    return hits + rng.uniform(0.02, 0.15) * motor


def _rain(n: int, rng: np.random.Generator) -> F64:
    hiss = _butter(rng.standard_normal(n), "highpass", rng.uniform(1500.0, 4000.0), order=2)
    hiss *= _smooth_env(n, rng, 2.0, 0.7, 1.0)
    rate = rng.uniform(40.0, 300.0)
    n_drops = int(rng.poisson(rate * n / SR))
    drops = np.zeros(n)
    idx = rng.integers(0, n, n_drops)
    np.add.at(drops, idx, rng.uniform(0.2, 1.0, n_drops) * rng.choice([-1.0, 1.0], n_drops))
    klen = int(0.006 * SR)
    kt = np.arange(klen) / SR
    kernel = np.sin(2 * np.pi * rng.uniform(2000.0, 5000.0) * kt) * np.exp(-kt / 0.0015)
    clicks = np.convolve(drops, kernel)[:n]
    return hiss + rng.uniform(0.5, 2.0) * clicks


def _wind(n: int, rng: np.random.Generator) -> F64:
    x = _butter(rng.standard_normal(n), "lowpass", rng.uniform(150.0, 700.0), order=2)
    x /= np.std(x) + 1e-12
    gust = _smooth_env(n, rng, rng.uniform(2.0, 5.0), 0.1, 1.0) ** 2
    # A faint whistle around an edge during strong gusts.
    whistle_f = rng.uniform(400.0, 900.0) * (1.0 + 0.1 * gust)
    whistle = np.sin(_phase(whistle_f)) * gust * rng.uniform(0.0, 0.15)
    return x * (0.2 + gust) + whistle


def _dog_bark(n: int, rng: np.random.Generator) -> F64:
    out = np.zeros(n)
    rate = rng.uniform(1.0, 3.0)
    t_next = rng.uniform(0.0, 1.0 / rate)
    formants = (rng.uniform(800.0, 1300.0), rng.uniform(2000.0, 3200.0))
    f0_base = rng.uniform(350.0, 800.0)
    while t_next * SR < n:
        ln = int(rng.uniform(0.08, 0.2) * SR)
        s = int(t_next * SR)
        ln = min(ln, n - s)
        if ln > 16:
            tt = np.arange(ln) / SR
            f0 = f0_base * rng.uniform(0.9, 1.1) * (1.0 - 0.3 * tt / tt[-1])  # falling pitch
            voiced = _harmonic(_phase(f0), 10, 0.8, rng)
            noisy = rng.standard_normal(ln) * 0.4
            env = np.sin(np.pi * np.arange(ln) / ln) ** 0.5 * np.exp(-tt / rng.uniform(0.05, 0.12))
            bark = (voiced + noisy) * env
            shaped = sum(_butter(bark, "bandpass", (f * 0.8, f * 1.2), order=2) for f in formants)
            out[s : s + ln] += np.asarray(shaped) + 0.2 * bark
        t_next += rng.uniform(0.7, 1.3) / rate
    if not out.any():  # the first bark fell after the window: put one at the start
        return _dog_bark_at_start(n, rng)
    return out


def _dog_bark_at_start(n: int, rng: np.random.Generator) -> F64:
    ln = min(n, int(0.12 * SR))
    tt = np.arange(ln) / SR
    voiced = _harmonic(_phase(np.full(ln, rng.uniform(350.0, 800.0))), 10, 0.8, rng)
    out = np.zeros(n)
    out[:ln] = _butter(voiced * np.exp(-tt / 0.08), "bandpass", (700.0, 3000.0), order=2)
    return out


_RECIPES: dict[str, Callable[[int, np.random.Generator], F64]] = {
    "traffic": _traffic,
    "engine": _engine,
    "horn": _horn,
    "glass_break": _glass_break,
    "construction": _construction,
    "rain": _rain,
    "wind": _wind,
    "dog_bark": _dog_bark,
}


# --------------------------------------------------------------------------- public API


def synthesize(
    label: str,
    n_samples: int,
    rng: np.random.Generator,
    *,
    siren_pattern: str = "wail",
    hilo_hz: tuple[float, float] = (440.0, 587.0),
) -> npt.NDArray[np.float32]:
    """Render ``n_samples`` of one ``label`` event: float32, 16 kHz, peak <= 1.

    Levels are random in -30..-6 dBFS RMS (silence: -75..-60). ``siren_pattern`` and
    ``hilo_hz`` only affect ``label == "siren"``.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if not 0 < n_samples <= MAX_SAMPLES:
        raise ValueError(f"n_samples must be in 1..{MAX_SAMPLES}, got {n_samples}")
    if siren_pattern not in SIREN_PATTERNS:
        raise ValueError(f"unknown siren pattern {siren_pattern!r}; expected {SIREN_PATTERNS}")
    if label == "silence":
        return _silence(n_samples, rng)
    if label == "siren":
        x = _siren(n_samples, rng, siren_pattern, hilo_hz)
    else:
        x = _RECIPES[label](n_samples, rng)
    return _finish(x, rng.uniform(*EVENT_DBFS))


def background(n_samples: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A low-level city bed (distant traffic hum and mains-like drone), -50..-38 dBFS."""
    if not 0 < n_samples <= MAX_SAMPLES:
        raise ValueError(f"n_samples must be in 1..{MAX_SAMPLES}, got {n_samples}")
    x = _colored_noise(n_samples, rng, rng.uniform(1.5, 2.0))
    x = _butter(x, "lowpass", rng.uniform(400.0, 1200.0), order=2)
    x /= np.std(x) + 1e-12
    x *= _smooth_env(n_samples, rng, 0.5, 0.7, 1.0)
    hum_f = rng.uniform(45.0, 110.0)
    x += rng.uniform(0.05, 0.3) * _harmonic(2 * np.pi * hum_f * _t(n_samples), 3, 1.0, rng)
    return _finish(x, rng.uniform(*BACKGROUND_DBFS))
