"""Golden clips shipped with an adapter: one bounded format both sides parse, the TUF
target that carries them, and the device's shadow check that runs them before a switch.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from fleet_model.errors import GoldenError
from fleet_model.golden import MAGIC, encode_golden, golden_accuracy, parse_golden

X = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) / 8  # exact in float16
Y = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)


def test_golden_clips_round_trip_with_their_labels() -> None:
    x, y = parse_golden(encode_golden(X, Y))
    assert np.array_equal(x, X) and np.array_equal(y, Y)


def test_malformed_golden_clips_raise_only_golden_errors() -> None:
    good = encode_golden(X, Y)
    header_len = struct.unpack(">I", good[len(MAGIC) : len(MAGIC) + 4])[0]
    nan = encode_golden(X, Y)[:-2] + struct.pack("<e", float("nan"))
    bad = [
        b"",
        b"GOLD2\n" + good[6:],
        good[:-1],  # payload shorter than announced
        good + b"\0\0\0\0",
        good[: len(MAGIC)] + struct.pack(">I", 10**9) + good[len(MAGIC) + 4 :],
        good[: len(MAGIC) + 4] + b"{" * header_len + good[len(MAGIC) + 4 + header_len :],
        nan,
        b"\0" * (5 * 1024 * 1024),
    ]
    rng = np.random.default_rng(7)
    bad += [rng.bytes(int(n)) for n in rng.integers(0, 200, 50)]
    bad += [MAGIC + rng.bytes(int(n)) for n in rng.integers(0, 200, 50)]
    for data in bad:
        with pytest.raises(GoldenError):
            parse_golden(data)


def test_labels_must_match_the_windows_and_values_fit_float16() -> None:
    with pytest.raises(GoldenError):
        encode_golden(X, Y[:-1])
    with pytest.raises(GoldenError):
        encode_golden(X * 1e6, Y)  # beyond float16: inf
    with pytest.raises(GoldenError):
        encode_golden(X, -Y - 1)


def test_golden_accuracy_is_the_top1_share() -> None:
    probs = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2, 2]]
    assert golden_accuracy(probs, Y) == pytest.approx(5 / 6)


class _Model:
    """A classifier stand-in: predicts ``labels`` (one-hot), or raises, or emits NaN."""

    def __init__(self, labels: list[int] | None, nan: bool = False) -> None:
        self.labels, self.nan = labels, nan

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.labels is None:
            raise RuntimeError("session broken")
        out = np.eye(3, dtype=np.float32)[self.labels][: len(x)]
        return out * np.nan if self.nan else out


def test_the_shadow_check_passes_a_candidate_that_reaches_the_signed_accuracy(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tuf")
    from edge_daemon.ota_compose import golden_check
    from edge_daemon.ota_slots import GoldenClips

    path = tmp_path / "golden.bin"
    path.write_bytes(encode_golden(X, Y))
    assert golden_check(_Model([0, 0, 1, 1, 2, 2]), GoldenClips(path, 1.0)) == ""
    assert golden_check(_Model([0, 0, 1, 1, 2, 0]), GoldenClips(path, 0.8)) == ""
    assert golden_check(_Model([1, 1, 0, 0, 2, 2]), GoldenClips(path, 0.5)) == "golden_accuracy"
    assert golden_check(_Model(None), GoldenClips(path, 0.5)) == "shadow_inference"
    assert golden_check(_Model(Y.tolist(), nan=True), GoldenClips(path, 0.5)) == "shadow_output"
    path.write_bytes(b"not golden clips")
    assert golden_check(_Model(Y.tolist()), GoldenClips(path, 0.5)) == "golden_malformed"


def _golden_device(tmp_path: Path, verdict: str = ""):  # type: ignore[no-untyped-def]
    pytest.importorskip("tuf")
    from cloud_sidecar.ota_serve import ChunkServer
    from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger
    from edge_daemon.ota_slots import HealthPolicy, SlotManager
    from edge_daemon.ota_update import TufUpdateWorker
    from tests.unit import slot_fakes
    from tests.unit.test_ota_transfer import _pair
    from tests.unit.test_ota_update import LIMITS
    from tests.unit.tuf_world import STATE_KEY, make_world

    w = make_world(tmp_path)
    server = ChunkServer(w.repo.dir, lambda *_: True, LIMITS)
    client = w.client(state="device")
    client._fetcher = ChunkFetcher(_pair(server), tmp_path / "device", LIMITS, sleep=lambda s: 0)
    seen: list[tuple[bytes, float]] = []
    reports: list[tuple[str, int, str]] = []

    def check(model: str, golden):  # type: ignore[no-untyped-def]
        seen.append((golden.path.read_bytes(), golden.min_accuracy) if golden else (b"", -1.0))
        return verdict

    slots = SlotManager(
        tmp_path / "device",
        build=slot_fakes.build,
        load=slot_fakes.load,
        shadow_check=check,
        swap=lambda m: None,
        report=lambda s, v, r: reports.append((s, v, r)),
        policy=HealthPolicy(min_windows=5),
    )
    slots.recover()
    ledger = FailureLedger(
        tmp_path / "device" / "ota" / "failures.json", LIMITS, state_key=STATE_KEY
    )
    return w, TufUpdateWorker(client, slots, ledger, lambda s, v, r: None), seen, reports, slots


def _add_with_golden(w, version: int = 1, min_percent: int = 75) -> str:  # type: ignore[no-untyped-def]
    from cloud_sidecar.tuf_repo import AdapterCustom
    from tests.unit.tuf_world import BASE, FORMAT

    name = f"adapter-v{version}.bin"
    custom = AdapterCustom(BASE, FORMAT, version, "all", 100, f"golden-v{version}.bin", min_percent)
    w.repo.add_target(name, b"adapter" * 50, custom, encode_golden(X, Y))
    return name


def test_an_adapter_with_golden_clips_hands_them_verified_to_the_shadow_check(
    tmp_path: Path,
) -> None:
    w, worker, seen, _reports, slots = _golden_device(tmp_path)
    _add_with_golden(w)
    assert worker.run_once() == "active"
    assert seen == [(encode_golden(X, Y), 0.75)]  # the signed bytes and the signed bound
    assert slots.record.active is not None and slots.record.active.adapter_version == 1
    assert not list(worker.client.staging_dir.glob("*golden*"))  # not kept once checked


def test_a_candidate_failing_its_golden_clips_is_never_switched_and_says_why(
    tmp_path: Path,
) -> None:
    w, worker, _seen, reports, slots = _golden_device(tmp_path, verdict="golden_accuracy")
    _add_with_golden(w)
    assert worker.run_once() == "failed:install"
    assert slots.record.active is None  # still the base model
    assert reports[-1] == ("failed", 1, "golden_accuracy")


def test_tampered_golden_clips_are_refused_before_anything_is_staged(tmp_path: Path) -> None:
    w, worker, seen, reports, _slots = _golden_device(tmp_path)
    _add_with_golden(w)
    info = w.repo.target_files()["golden-v1.bin"]
    (w.repo.targets_dir / f"{info.hashes['sha256']}.golden-v1.bin").write_bytes(
        encode_golden(X, np.zeros_like(Y))  # labels changed after signing
    )
    assert worker.run_once() == "failed:bad_hash"
    assert seen == [] and reports[-1] == ("failed", 1, "bad_hash")


def test_a_golden_reference_to_clips_not_made_for_this_adapter_is_refused(tmp_path: Path) -> None:
    from tuf.api.metadata import TargetFile

    from tests.unit.tuf_world import BASE

    w, worker, _seen, _reports, _slots = _golden_device(tmp_path)
    _add_with_golden(w)
    with w.repo._writer():  # a second adapter pointing at the first one's clips
        targets = w.repo.targets().signed
        info = TargetFile.from_data("adapter-v2.bin", b"other", ["sha256"])
        info.unrecognized_fields["custom"] = {
            "base_model_sha256": BASE,
            "adapter_format": "lora-edge-v1",
            "adapter_version": 2,
            "golden_target": "golden-v1.bin",
            "golden_min_percent": 0,
        }
        targets.targets[info.path] = info
        w.repo._write_targets(targets)
    result = worker.client.check(0)
    assert ("adapter-v2.bin", "bad_golden") in [(s.name, s.reason) for s in result.skipped]
    assert result.chosen is not None and result.chosen.name == "adapter-v1.bin"


def test_a_roll_forward_carries_the_earlier_adapters_golden_clips(tmp_path: Path) -> None:
    w, _worker, _seen, _reports, _slots = _golden_device(tmp_path)
    _add_with_golden(w, 1, 50)
    bad = _add_with_golden(w, 2, 90)
    pub = w.repo.roll_forward_to(bad)
    files = w.repo.target_files()
    custom = files[pub.name].custom
    assert custom["adapter_version"] == 3 and custom["golden_min_percent"] == 50
    golden = files[custom["golden_target"]]
    assert golden.custom == {"golden_for": pub.name}
    assert w.repo.artifact(custom["golden_target"]) == encode_golden(X, Y)
