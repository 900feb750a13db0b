"""The OTA clock without an RTC: a lower bound that survives reboots and never goes back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_daemon.ota_clock import TrustedClock

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STATE_KEY = bytes(range(32))


def _clock(path: Path, system: list[datetime], mono: list[float]) -> TrustedClock:
    return TrustedClock(
        path,
        state_key=STATE_KEY,
        timestamp_lifetime=timedelta(hours=24),
        system_now=lambda: system[0],
        monotonic=lambda: mono[0],
    )


def test_a_verified_timestamp_raises_the_floor_to_its_signing_time(tmp_path: Path) -> None:
    system, mono = [EPOCH], [5.0]
    clock = _clock(tmp_path / "clock.json", system, mono)
    clock.observe_timestamp(T0 + timedelta(hours=24))
    assert clock.now() == T0  # the system clock (1970) cannot pull it back


def test_the_floor_advances_with_uptime_and_survives_a_reboot(tmp_path: Path) -> None:
    system, mono = [EPOCH], [100.0]
    clock = _clock(tmp_path / "clock.json", system, mono)
    clock.observe_timestamp(T0 + timedelta(hours=24))
    mono[0] += 3600
    assert clock.now() == T0 + timedelta(hours=1)
    clock.checkpoint()
    mono[0] = 2.0  # reboot: monotonic time restarts, the system clock says 1970
    rebooted = _clock(tmp_path / "clock.json", system, mono)
    assert rebooted.now() == T0 + timedelta(hours=1)


def test_the_system_clock_moves_now_forward_but_never_the_persisted_floor(tmp_path: Path) -> None:
    system, mono = [T0 + timedelta(days=365)], [0.0]
    clock = _clock(tmp_path / "clock.json", system, mono)
    clock.observe_timestamp(T0 + timedelta(hours=24))
    assert clock.now() == T0 + timedelta(days=365)
    clock.checkpoint()
    system[0] = T0
    assert _clock(tmp_path / "clock.json", system, mono).now() == T0  # not a year ahead


def test_an_older_timestamp_never_lowers_the_floor(tmp_path: Path) -> None:
    system, mono = [EPOCH], [0.0]
    clock = _clock(tmp_path / "clock.json", system, mono)
    clock.observe_timestamp(T0 + timedelta(hours=24))
    clock.observe_timestamp(T0)
    assert clock.now() == T0


def test_an_unreadable_floor_file_is_tampered_and_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "clock.json").write_bytes(b"not json")
    system, mono = [T0], [0.0]
    clock = _clock(tmp_path / "clock.json", system, mono)
    assert clock.now() == T0
    assert clock.tampered  # the update client refuses updates (test_ota_state.py)
    clock.observe_timestamp(T0 + timedelta(hours=48))
    clock.checkpoint()
    assert (tmp_path / "clock.json").read_bytes() == b"not json"
