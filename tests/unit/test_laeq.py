"""LAeq,1s: IEC 61672 A-weighting, AES17 levels, calibration, and the per-second meter."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edge_daemon.sensors.laeq import (
    FLOOR_DBFS,
    LaeqMeter,
    a_weighting_db,
    dbfs,
    laeq_dbfs,
    mean_square,
    tap,
)

RATE = 16_000


def _sine(f: float, amp: float, rate: int = RATE, seconds: float = 1.0) -> npt.NDArray[np.float32]:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def _delta(f: float, rate: int = RATE) -> float:
    x = _sine(f, 0.3, rate)
    return laeq_dbfs(x, rate) - dbfs(mean_square(x, weighted=False, rate=rate))


@pytest.mark.parametrize("level", [-3.0, -20.0, -45.0])
def test_1khz_sine_reads_its_level_within_half_a_db(level: float) -> None:
    assert laeq_dbfs(_sine(1000, 10 ** (level / 20))) == pytest.approx(level, abs=0.5)
    assert laeq_dbfs(_sine(997, 10 ** (level / 20))) == pytest.approx(level, abs=0.05)


def test_100hz_reads_19_1_db_below_unweighted() -> None:
    assert _delta(100) == pytest.approx(-19.1, abs=0.1)


def test_10khz_reads_2_5_db_below_unweighted_where_the_rate_can_carry_it() -> None:
    assert _delta(10_000, rate=48_000) == pytest.approx(-2.5, abs=0.1)


def test_weighting_matches_the_iec_61672_table() -> None:
    # exact base-10 band frequencies where the nominal one differs (31.5 → 31.62, 16k → 15.85k)
    table = {31.62: -39.4, 63: -26.2, 125: -16.1, 250: -8.6, 500: -3.2, 1000: 0.0,
             2000: 1.2, 4000: 1.0, 8000: -1.1, 15849: -6.6}  # fmt: skip
    got = a_weighting_db(list(table))
    np.testing.assert_allclose(got, list(table.values()), atol=0.1)


def test_frequency_domain_level_agrees_with_a_bilinear_iir_a_filter_on_noise() -> None:
    """Cross-check against the textbook time-domain filter (scipy, test only)."""
    from scipy import signal

    f1, f2, f3, f4 = 20.598997, 107.65265, 737.86223, 12194.217
    zeros = [0, 0, 0, 0]
    poles = [-2 * np.pi * f for f in (f1, f1, f4, f4, f2, f3)]
    b, a = signal.zpk2tf(zeros, poles, (2 * np.pi * f4) ** 2 * 10 ** (1.9997 / 20))
    rate = 48_000  # oversampled so the bilinear warp near Nyquist does not matter
    bz, az = signal.bilinear(b, a, rate)
    rng = np.random.default_rng(3)
    noise = signal.lfilter([1.0], [1.0, -0.95], rng.standard_normal(rate * 3)) * 0.01
    x = noise.astype(np.float32)
    filtered = signal.lfilter(bz, az, x)[rate:]  # skip the filter's settling
    assert laeq_dbfs(x[rate : 2 * rate], rate) == pytest.approx(
        dbfs(float(np.mean(filtered[:rate] ** 2))), abs=0.3
    )


def test_calibration_offset_turns_dbfs_into_db_spl() -> None:
    meter = LaeqMeter(calibration_db=120.0)
    (level,) = meter.push(_sine(1000, 10 ** (-26 / 20)))  # a -26 dBFS @ 94 dB SPL microphone
    assert level == pytest.approx(94.0, abs=0.05)


def test_meter_reports_one_level_per_second_whatever_the_block_size() -> None:
    meter = LaeqMeter(calibration_db=0.0)
    x = np.concatenate([_sine(1000, 0.5), _sine(1000, 0.05), _sine(1000, 0.005)])
    levels: list[float] = []
    for i in range(0, len(x), 1234):
        levels += meter.push(x[i : i + 1234])
    assert levels == pytest.approx([-6.02, -26.02, -46.02], abs=0.05)
    assert meter.push(np.zeros(100, dtype=np.float32)) == []  # partial second held back


def test_digital_silence_reads_the_floor_not_minus_infinity() -> None:
    assert laeq_dbfs(np.zeros(RATE, dtype=np.float32)) == FLOOR_DBFS


def test_tap_passes_audio_through_unchanged_and_reports_levels() -> None:
    blocks = [_sine(1000, 0.5, seconds=0.5) for _ in range(4)]
    got: list[float] = []
    out = list(tap(iter(blocks), LaeqMeter(100.0), got.append))
    assert all(a is b for a, b in zip(out, blocks, strict=True))
    assert got == pytest.approx([93.98, 93.98], abs=0.05)
