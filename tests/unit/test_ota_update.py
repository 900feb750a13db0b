"""The update worker end to end in memory: TUF check, chunked download, slots, backoff, parking."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sidecar.ota_serve import ChunkServer
from edge_daemon.ota_slots import HealthPolicy, SlotManager
from fleet_protocol.ota_transfer import TransferLimits
from tests.unit.slot_fakes import build, load, shadow_check
from tests.unit.test_ota_transfer import _pair
from tests.unit.tuf_world import STATE_KEY, make_world

pytest.importorskip("tuf")

from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger
from edge_daemon.ota_update import ObservedClassifier, TufUpdateWorker

LIMITS = TransferLimits(rate_bytes_per_s=10**9, park_after_failures=3, backoff_base_s=0.0)


def _device(tmp_path: Path):  # type: ignore[no-untyped-def]
    w = make_world(tmp_path)
    server = ChunkServer(w.repo.dir, lambda *_: True, LIMITS)
    fetcher = ChunkFetcher(_pair(server), tmp_path / "device", LIMITS, sleep=lambda s: None)
    client = w.client(state="device")
    client._fetcher = fetcher
    reports: list[tuple[str, int, str]] = []
    running: list[str] = []
    slots: SlotManager[str] = SlotManager(
        tmp_path / "device",
        build=build,
        load=load,
        shadow_check=shadow_check,
        swap=running.append,
        report=lambda s, v, r: reports.append((s, v, r)),
        policy=HealthPolicy(min_windows=5),
    )
    running.append(slots.recover())
    ledger = FailureLedger(
        tmp_path / "device" / "ota" / "failures.json", LIMITS, state_key=STATE_KEY
    )
    worker = TufUpdateWorker(client, slots, ledger, lambda s, v, r: None)
    return w, server, worker, slots, running, reports


def test_an_announced_update_is_fetched_in_chunks_staged_switched_and_confirmed(
    tmp_path: Path,
) -> None:
    w, server, worker, slots, running, reports = _device(tmp_path)
    w.add(b"adapter-one" * 1000, 1)
    assert worker.run_once() == "active"
    assert running[-1] == "model:" + "adapter-one" * 1000
    assert server.requests > 1
    observed = ObservedClassifier(
        type("M", (), {"model_sha256": "x", "predict": lambda self, f: f})(), slots.observe
    )
    import numpy as np

    for _ in range(5):
        observed.predict(np.array([0.1, 0.9], dtype=np.float32))
    assert slots.record.state == "confirmed"
    assert worker.run_once() == "up_to_date"
    states = [s for s, _, _ in reports]
    assert states[-6:] == ["queued", "downloading", "verifying", "staged", "active", "confirmed"]


def test_a_target_that_keeps_failing_is_parked_and_no_longer_requested(tmp_path: Path) -> None:
    w, server, worker, _slots, running, reports = _device(tmp_path)
    name = w.add(b"good bytes" * 100, 1)
    sha = w.repo.target_files()[name].hashes["sha256"]
    (w.repo.targets_dir / f"{sha}.{name}").write_bytes(b"evil bytes" * 100)  # tampered
    outcomes = [worker.run_once() for _ in range(3)]
    assert outcomes == ["failed:bad_hash", "failed:bad_hash", "parked"]
    before = server.requests
    assert worker.run_once() == "parked"
    assert server.requests - before < 10  # metadata refresh only, never the artifact again
    assert running == ["base"]
    assert reports[-1] == ("failed", 1, "parked")
