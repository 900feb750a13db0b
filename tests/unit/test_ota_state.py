"""The OTA state on the SD card (floor, clock, failure ledger) is sealed: editing, replacing
or deleting it never lowers the floor or revives a parked target; updates stop instead.

The policy is edge_daemon/ota_state.py's: a tampered (or, once initialised, missing)
file is never used nor overwritten, every round is refused with ``ota_state_tampered``
on the status topic, and the active model keeps running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_daemon.errors import OtaStateError
from edge_daemon.ota_state import TAMPERED, SealedFile, derive_state_key
from tests.unit.tuf_world import STATE_KEY, make_world

pytest.importorskip("tuf")

from edge_daemon.errors import OtaRefusedError
from edge_daemon.ota_fetch import FailureLedger
from edge_daemon.ota_update import TufUpdateWorker
from tests.unit.test_ota_update import LIMITS, _device

OTHER_KEY = bytes(reversed(range(32)))


def test_a_sealed_file_reads_back_only_under_its_key_and_its_own_name(tmp_path: Path) -> None:
    SealedFile(tmp_path / "failures.json", STATE_KEY).save({"adapter_version": 9})
    assert SealedFile(tmp_path / "failures.json", STATE_KEY).load() == {"adapter_version": 9}
    other = SealedFile(tmp_path / "failures.json", OTHER_KEY)  # another device's card
    assert other.load() is None and other.tampered == "MAC does not verify"
    (tmp_path / "floor.json").write_bytes((tmp_path / "failures.json").read_bytes())
    swapped = SealedFile(tmp_path / "floor.json", STATE_KEY)  # the name is inside the MAC
    assert swapped.load() is None and swapped.tampered
    with pytest.raises(OtaStateError):
        swapped.save({"adapter_version": 1})
    assert (tmp_path / "floor.json").read_bytes() == (tmp_path / "failures.json").read_bytes()


def test_the_state_key_is_derived_from_the_storage_key_and_is_not_it() -> None:
    storage = bytes(range(100, 132))
    key = derive_state_key(storage)
    assert len(key) == 32 and key != storage and key == derive_state_key(storage)
    assert key != derive_state_key(STATE_KEY)
    with pytest.raises(OtaStateError):
        derive_state_key(b"short")


def test_bootstrap_seals_floor_clock_and_ledger_before_the_trusted_root(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    c = w.client()
    for name in ("floor.json", "clock.json", "failures.json"):
        doc = json.loads((c.dir / name).read_bytes())
        assert set(doc) == {"body", "mac"}
        assert SealedFile(c.dir / name, STATE_KEY).load() == doc["body"]
    assert c.floor == 0 and c.tampered() == ""


def _floor_two(tmp_path: Path):  # type: ignore[no-untyped-def]
    w = make_world(tmp_path)
    w.add(b"one", 1)
    w.add(b"two", 2)
    c = w.client()
    assert c.check(0).chosen.adapter_version == 2  # type: ignore[union-attr]
    assert c.floor == 2
    return w, c


def test_a_floor_lowered_by_hand_without_the_mac_refuses_updates_and_is_kept(
    tmp_path: Path,
) -> None:
    w, c = _floor_two(tmp_path)
    forged = json.dumps({"adapter_version": 0}).encode()  # the unsealed, pre-MAC format
    (c.dir / "floor.json").write_bytes(forged)
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == TAMPERED
    assert (c.dir / "floor.json").read_bytes() == forged  # evidence kept, not laundered


def test_a_floor_body_edited_under_the_old_mac_refuses_updates(tmp_path: Path) -> None:
    w, c = _floor_two(tmp_path)
    doc = json.loads((c.dir / "floor.json").read_bytes())
    doc["body"]["adapter_version"] = 1
    (c.dir / "floor.json").write_text(json.dumps(doc))
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == TAMPERED


def test_a_deleted_floor_after_initialisation_refuses_updates(tmp_path: Path) -> None:
    w, c = _floor_two(tmp_path)
    (c.dir / "floor.json").unlink()
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == TAMPERED
    assert not (c.dir / "floor.json").exists()


def test_a_tampered_clock_file_refuses_updates_and_is_not_rewritten(tmp_path: Path) -> None:
    w, c = _floor_two(tmp_path)
    w.clocks.clear()  # a reboot: the clock is read from the card again
    (c.dir / "clock.json").write_text(json.dumps({"floor": 0}))  # back to 1970, no MAC
    fresh = w.client()
    assert fresh.clock.tampered
    with pytest.raises(OtaRefusedError) as e:
        fresh.check(0)
    assert e.value.reason == TAMPERED
    fresh.clock.checkpoint()
    assert json.loads((c.dir / "clock.json").read_bytes()) == {"floor": 0}


def test_editing_the_ledger_never_revives_a_parked_target_and_the_round_is_reported(
    tmp_path: Path,
) -> None:
    w, server, worker, slots, running, _reports = _device(tmp_path)
    name = w.add(b"good bytes" * 100, 1)
    sha = w.repo.target_files()[name].hashes["sha256"]
    (w.repo.targets_dir / f"{sha}.{name}").write_bytes(b"evil bytes" * 100)
    assert [worker.run_once() for _ in range(3)][-1] == "parked"
    ledger_path = tmp_path / "device" / "ota" / "failures.json"
    for forged in (b"{}", None):  # reset without the MAC, then deleted altogether
        if forged is None:
            ledger_path.unlink()
        else:
            ledger_path.write_bytes(forged)
        ledger = FailureLedger(ledger_path, LIMITS, state_key=STATE_KEY)
        assert ledger.tampered and ledger.parked(sha) and not ledger.may_try(sha)
        said: list[tuple[str, int, str]] = []
        rebooted = TufUpdateWorker(
            worker.client, slots, ledger, lambda s, v, r, out=said: out.append((s, v, r))
        )
        before = server.requests
        assert rebooted.run_once() == f"rejected:{TAMPERED}"
        assert said == [("rejected", 0, TAMPERED)]  # on fleet/v1/<device>/ota/status
        assert server.requests == before  # nothing fetched at all
    assert running == ["base"]  # the active model keeps running


def test_a_worker_round_with_a_tampered_floor_reports_rejected_on_the_status_topic(
    tmp_path: Path,
) -> None:
    w, _server, worker, _slots, running, _reports = _device(tmp_path)
    w.add(b"adapter" * 100, 1)
    (tmp_path / "device" / "ota" / "floor.json").write_text('{"adapter_version": 0}')
    said: list[tuple[str, int, str]] = []
    worker._report = lambda s, v, r: said.append((s, v, r))
    assert worker.run_once() == f"rejected:{TAMPERED}"
    assert said == [("rejected", 0, TAMPERED)]
    assert running == ["base"]


def test_random_bytes_in_a_state_file_are_tampered_never_an_exception_or_a_value(
    tmp_path: Path,
) -> None:
    import numpy as np

    rng = np.random.default_rng(11)
    good = json.dumps({"body": {"adapter_version": 3}, "mac": "00" * 32}).encode()
    samples = [rng.bytes(int(n)) for n in rng.integers(0, 300, 60)]
    samples += [good[: int(n)] for n in rng.integers(0, len(good), 20)]
    samples += [b'{"body": [], "mac": "x"}', b'{"body": {}, "mac": 5}', b"null", b"\xff" * 10]
    for i, data in enumerate(samples):
        path = tmp_path / f"s{i}" / "floor.json"
        path.parent.mkdir()
        path.write_bytes(data)
        f = SealedFile(path, STATE_KEY)
        assert f.load() is None and f.tampered
