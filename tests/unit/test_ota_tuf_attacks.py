"""The device's TUF client refuses each attack class of the issue, and recovers where TUF says.

Modelled on python-tuf's tests/test_updater_top_level_update.py: a real repository,
the real client, an in-memory fetcher that plays the attacker.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.tuf_world import BASE, endless, make_world, software_online_signer

pytest.importorskip("tuf")

from tuf.api.metadata import Metadata, TargetFile, Timestamp

from edge_daemon.errors import OtaRefusedError


def test_a_fresh_device_verifies_and_stages_the_newest_adapter_for_its_base(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one" * 100, 1)
    name = w.add(b"two" * 100, 2)
    c = w.client()
    result = c.check(installed_version=0)
    assert result.chosen is not None and result.chosen.name == name
    path = c.download(result.chosen)
    assert path.read_bytes() == b"two" * 100
    assert (c.metadata_dir / "root.json").exists() and (c.metadata_dir / "targets.json").exists()


def test_rollback_to_an_older_timestamp_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    old_ts = (w.repo.metadata_dir / "timestamp.json").read_bytes()
    w.add(b"two", 2)
    w.client().check(0)
    w.fetcher.override["metadata/timestamp.json"] = old_ts
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "rollback"


def test_an_adapter_below_the_highest_verified_version_is_refused_even_if_never_applied(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    w.add(b"two", 2)
    c = w.client()
    assert c.check(installed_version=0).chosen.adapter_version == 2  # type: ignore[union-attr]
    assert c.floor == 2  # seen and verified, not applied
    # a signed, newer targets metadata that only lists v1 (an operator error or a
    # compromised pipeline): the device will not go below what it has verified
    with w.repo._writer():
        targets = w.repo.targets().signed
        del targets.targets["adapter-v2.safetensors"]
        w.repo._write_targets(targets)
    result = w.client().check(installed_version=0)
    assert result.chosen is None
    assert ("adapter-v1.safetensors", "rollback") in [(s.name, s.reason) for s in result.skipped]


def test_expired_timestamp_is_refused_freeze_attack(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    frozen = (w.repo.metadata_dir / "timestamp.json").read_bytes()
    w.system_now[0] += timedelta(days=2)  # the attacker keeps serving yesterday's metadata
    w.fetcher.override["metadata/timestamp.json"] = frozen
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "expired"


def test_mix_and_match_of_targets_from_another_snapshot_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    old_targets = (w.repo.metadata_dir / "2.targets.json").read_bytes()
    w.add(b"two", 2)  # snapshot 3 names targets 3
    w.fetcher.override["metadata/3.targets.json"] = old_targets
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "rollback"  # targets v2 where the snapshot says v3


def test_new_root_signed_below_the_threshold_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.client().check(0)
    # one of the two required root keys signs a root that hands everything to itself
    w.repo.rotate_root(old_signers=w.roots[:1], new_signers=w.roots[:1], threshold=1)
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "bad_signature"


def test_timestamp_signed_by_a_key_the_root_does_not_trust_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    ts = Metadata[Timestamp].from_bytes((w.repo.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.version += 1
    ts.sign(software_online_signer())  # the attacker's own key
    w.fetcher.override["metadata/timestamp.json"] = ts.to_bytes()
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "bad_signature"


def test_endless_metadata_is_cut_at_its_byte_cap(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.fetcher.override["metadata/timestamp.json"] = endless
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "too_large"


def test_endless_artifact_is_cut_at_its_signed_length(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    name = w.add(b"x" * 1000, 1)
    sha = w.repo.target_files()[name].hashes["sha256"]
    w.fetcher.override[f"targets/{sha}.{name}"] = endless
    c = w.client()
    target = c.check(0).chosen
    assert target is not None
    with pytest.raises(OtaRefusedError) as e:
        c.download(target)
    assert e.value.reason == "too_large"
    assert list(c.staging_dir.iterdir()) == []


def test_a_tampered_artifact_is_refused_and_nothing_is_staged(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    name = w.add(b"x" * 1000, 1)
    sha = w.repo.target_files()[name].hashes["sha256"]
    w.fetcher.override[f"targets/{sha}.{name}"] = b"y" * 1000
    c = w.client()
    target = c.check(0).chosen
    assert target is not None
    with pytest.raises(OtaRefusedError) as e:
        c.download(target)
    assert e.value.reason == "bad_hash"
    assert list(c.staging_dir.iterdir()) == []


def test_fast_forward_attack_is_recovered_after_the_online_key_is_rotated(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    # the attacker stole the timestamp key and pushed the device to timestamp v1000
    stolen = w.online["timestamp"]
    ts = Metadata[Timestamp].from_bytes((w.repo.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.version = 1000
    ts.sign(stolen)
    w.fetcher.override["metadata/timestamp.json"] = ts.to_bytes()
    c = w.client()
    c.check(0)
    # the legitimate repository cannot go past v1000 ... until root rotates the key
    del w.fetcher.override["metadata/timestamp.json"]
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "rollback"
    w.repo.rotate_root(
        old_signers=w.roots[:2],
        new_signers=w.roots,
        threshold=2,
        new_online={"timestamp": software_online_signer()},  # only the stolen role's key
    )
    root = w.repo.root().signed
    assert root.roles["timestamp"].keyids == [w.repo._online["timestamp"].public_key.keyid]  # type: ignore[index]
    assert root.roles["targets"].keyids == [w.online["targets"].public_key.keyid]
    name = w.add(b"two", 2)
    result = w.client().check(0)
    assert result.chosen is not None and result.chosen.name == name


def test_a_target_path_that_escapes_its_directory_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    with w.repo._writer():  # the repository API refuses such names; write one anyway
        targets = w.repo.targets().signed
        info = TargetFile.from_data("../../etc/adapter", b"evil", ["sha256"])
        info.unrecognized_fields["custom"] = {
            "base_model_sha256": BASE,
            "adapter_format": "lora-edge-v1",
            "adapter_version": 9,
        }
        targets.targets[info.path] = info
        w.repo._write_targets(targets)
    result = w.client().check(0)
    assert result.chosen is None
    assert [(s.name, s.reason) for s in result.skipped] == [("../../etc/adapter", "bad_path")]


def test_an_adapter_built_for_another_base_model_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"other", 1, base="c" * 64)
    result = w.client().check(0)
    assert result.chosen is None
    assert [s.reason for s in result.skipped] == ["wrong_base_model"]


def test_a_device_outside_the_signed_rollout_percentage_waits(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"canary", 1, percent=0)
    assert [s.reason for s in w.client().check(0).skipped] == ["not_in_cohort"]
    w.add(b"everyone", 2, percent=100)
    assert w.client().check(0).chosen.adapter_version == 2  # type: ignore[union-attr]


def test_a_device_whose_clock_falls_back_to_1970_still_refuses_expired_metadata(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    w.client().check(0)  # verified timestamp: the floor is now at least its signing time
    # two days of uptime pass while the attacker blocks every newer timestamp; then
    # NTP is spoofed and the system clock says 1970 (a Pi without an RTC)
    w.monotonic[0] += timedelta(days=2).total_seconds()
    w.system_now[0] = datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(OtaRefusedError) as e:
        w.client().check(0)
    assert e.value.reason == "expired"
