"""Staged rollout: canary, widening on good reports, abort threshold, pause; cohorts by hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sidecar import rollout as ro
from fleet_protocol.ota import rollout_bucket

DEVICES = [f"dev-{i:03d}" for i in range(200)]
R = ro.Rollout("adapter-v2.bin", 2, 0, "running", (10, 50, 100))


def _states(devices: list[str], state: str, version: int = 2) -> dict[str, ro.DeviceState]:
    return {d: ro.DeviceState(d, state, version, "") for d in devices}


def test_cohorts_are_a_deterministic_hash_of_the_device_id_and_nest() -> None:
    assert rollout_bucket("dev-001") == rollout_bucket("dev-001")
    canary, half = ro.in_cohort(DEVICES, 10), ro.in_cohort(DEVICES, 50)
    assert set(canary) <= set(half) and 5 <= len(canary) <= 40 and 70 <= len(half) <= 130


def test_the_canary_widens_only_when_its_devices_confirm() -> None:
    canary = ro.in_cohort(DEVICES, 10)
    assert ro.decide(R, DEVICES, _states(canary, "active"))[0] == "hold"
    assert ro.decide(R, DEVICES, _states(canary, "confirmed"))[0] == "widen"
    last = ro.Rollout(R.target, 2, 2, "running", R.steps)
    assert ro.decide(last, DEVICES, _states(DEVICES, "confirmed"))[0] == "done"


def test_a_failure_rate_above_the_threshold_after_enough_reports_aborts() -> None:
    canary = ro.in_cohort(DEVICES, 10)
    states = _states(canary, "confirmed") | _states(canary[:2], "rolled_back")
    assert ro.decide(R, DEVICES, states, ro.RolloutPolicy(min_devices=50))[0] == "hold"
    action, counts = ro.decide(R, DEVICES, states, ro.RolloutPolicy(max_failure_rate=0.05))
    assert action == "abort" and counts["failed"] == 2


def test_a_paused_rollout_never_widens() -> None:
    paused = ro.Rollout(R.target, 2, 0, "paused", R.steps)
    assert ro.decide(paused, DEVICES, _states(DEVICES, "confirmed"))[0] == "hold"


def test_device_states_take_the_latest_report_from_the_audit_log() -> None:
    lines = [
        b'{"kind":"ota.device_status","subject":"dev-001","details":{"state":"active","adapter_version":2,"reason":""}}',
        b'{"kind":"sample.stored","subject":"dev-001","details":{}}',
        b"not json",
        b'{"kind":"ota.device_status","subject":"dev-001","details":{"state":"confirmed","adapter_version":2,"reason":""}}',
    ]
    assert ro.device_states(lines)["dev-001"].state == "confirmed"


def test_the_rollout_file_round_trips(tmp_path: Path) -> None:
    ro.save(tmp_path / "r.json", R)
    assert ro.load(tmp_path / "r.json") == R
    assert ro.load(tmp_path / "missing.json") is None


# ------------------------------------------------------- signed percentages (python-tuf)


def test_widening_and_abort_are_signed_and_devices_follow(tmp_path: Path) -> None:
    pytest.importorskip("tuf")
    from tests.unit.tuf_world import make_world

    w = make_world(tmp_path)
    w.add(b"good adapter", 1)
    bad = w.add(b"bad adapter", 2, percent=0)
    outside = next(d for d in DEVICES if rollout_bucket(d) >= 10)
    inside = next(d for d in DEVICES if rollout_bucket(d) < 10)
    w.repo.set_rollout_percent(bad, 10)
    assert w.client(inside, state="in").check(1).chosen.name == bad  # type: ignore[union-attr]
    assert w.client(outside, state="out").check(1).chosen is None
    pub = w.repo.roll_forward_to(bad)
    assert w.repo.target_files()[bad].custom["rollout_percent"] == 0
    for device, state in ((inside, "in"), (outside, "out")):
        chosen = w.client(device, state=state).check(2 if state == "in" else 1).chosen
        assert chosen is not None and chosen.name == pub.name and chosen.adapter_version == 3
    assert w.repo.artifact(pub.name) == b"good adapter"


def test_devices_learn_their_group_and_release_pin_from_signed_metadata(tmp_path: Path) -> None:
    pytest.importorskip("tuf")
    from cloud_sidecar.tuf_repo import AdapterCustom
    from tests.unit.tuf_world import BASE, FORMAT, make_world

    w = make_world(tmp_path)
    w.add(b"one", 1)
    w.add(b"two", 2)
    w.repo.add_target("north-v3.bin", b"north only", AdapterCustom(BASE, FORMAT, 3, "north"))
    w.repo.set_groups({"north": ["dev-n"], "south": ["dev-s"]}, {"south": 1})
    north = w.client("dev-n", state="n").check(0)
    south = w.client("dev-s", state="s").check(0)
    other = w.client("dev-x", state="x").check(0)
    assert north.chosen is not None and north.chosen.name == "north-v3.bin"
    assert south.chosen is not None and south.chosen.adapter_version == 1  # pinned
    assert ("adapter-v2.safetensors", "pinned") in [(s.name, s.reason) for s in south.skipped]
    assert other.chosen is not None and other.chosen.adapter_version == 2
    assert ("north-v3.bin", "not_in_group") in [(s.name, s.reason) for s in other.skipped]
