"""Two slots: stage, shadow-check, switch without a gap, health window, automatic rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_daemon.errors import OtaError
from edge_daemon.ota_slots import HealthPolicy, SlotManager
from tests.unit.slot_fakes import build, load, shadow_check

POLICY = HealthPolicy(min_windows=10, max_latency_s=0.1, max_boots_unconfirmed=2)


class Device:
    def __init__(self, state: Path) -> None:
        self.running: list[str] = []
        self.reports: list[tuple[str, int, str]] = []
        self.slots: SlotManager[str] = SlotManager(
            state,
            build=build,
            load=load,
            shadow_check=shadow_check,
            swap=self.running.append,
            report=lambda s, v, r: self.reports.append((s, v, r)),
            policy=POLICY,
        )
        self.running.append(self.slots.recover())

    def install(self, tmp: Path, version: int, content: bytes) -> str:
        adapter = tmp / f"adapter-{version}"
        adapter.write_bytes(content)
        self.slots.begin(version)
        return self.slots.install(adapter, version, "ab" * 32, baseline_confident=0.8)

    def healthy(self, n: int = 10, latency: float = 0.01, p: float = 0.9) -> None:
        for _ in range(n):
            self.slots.observe(True, latency, p)


def test_an_update_is_staged_checked_switched_and_confirmed(tmp_path: Path) -> None:
    d = Device(tmp_path / "state")
    assert d.running == ["base"]
    d.install(tmp_path, 1, b"one")
    assert d.running == ["base", "model:one"]
    d.healthy()
    assert [s for s, _, _ in d.reports] == [
        "confirmed",
        "queued",
        "verifying",
        "staged",
        "active",
        "confirmed",
    ]
    assert d.slots.status()["adapter_version"] == 1


def test_a_failing_shadow_check_never_switches(tmp_path: Path) -> None:
    d = Device(tmp_path / "state")
    with pytest.raises(OtaError):
        d.install(tmp_path, 1, b"bad-golden")
    assert d.running == ["base"]
    assert d.reports[-1] == ("failed", 1, "golden_mismatch")
    assert list((tmp_path / "state" / "ota" / "slots").iterdir()) == []


@pytest.mark.parametrize(
    ("ok", "latency", "p", "reason"),
    [
        (False, 0.01, 0.9, "inference_errors"),
        (True, 0.5, 0.9, "latency"),
        (True, 0.01, 0.1, "confidence_drop"),
    ],
)
def test_a_bad_health_window_rolls_back_and_says_why(
    tmp_path: Path, ok: bool, latency: float, p: float, reason: str
) -> None:
    d = Device(tmp_path / "state")
    d.install(tmp_path, 1, b"one")
    d.healthy()
    d.install(tmp_path, 2, b"two")
    for _ in range(10):
        d.slots.observe(ok, latency, p)
    assert d.running[-1] == "model:one"
    assert d.reports[-1] == ("rolled_back", 2, reason)
    assert d.slots.status()["adapter_version"] == 1


def test_a_crash_loop_after_the_switch_rolls_back_on_the_next_boot(tmp_path: Path) -> None:
    d = Device(tmp_path / "state")
    d.install(tmp_path, 1, b"one")
    d.healthy()
    d.install(tmp_path, 2, b"two")
    boots = [Device(tmp_path / "state") for _ in range(3)]  # the new model crashes each time
    assert [b.running[0] for b in boots] == ["model:two", "model:two", "model:one"]
    assert boots[-1].reports[-1] == ("rolled_back", 2, "crash_loop")


def test_a_damaged_active_slot_falls_back_to_a_model_that_loads(tmp_path: Path) -> None:
    d = Device(tmp_path / "state")
    d.install(tmp_path, 1, b"one")
    d.healthy()
    d.install(tmp_path, 2, b"two")
    d.healthy()
    active = d.slots.model_path(d.slots.record.active)
    assert active is not None
    active.write_bytes(b"garbage")  # SD card corruption
    rebooted = Device(tmp_path / "state")
    assert rebooted.running == ["model:one"]
    assert rebooted.reports[-1][0] == "rolled_back"
