"""The synthetic city as a dataset, read back by the reader, and ``pretrain --dataset`` end to end.

``devstack write-dataset`` writes the layout an operator's dataset uses, each clip one
event segment of a scene stream of the dataset's own seeds; the reader must give back
exactly those segments' windows (up to 16-bit rounding). Then the CLI pretrains on a tiny set (one epoch): the base directory holds
the golden and replay sets and the dataset manifest, all named by sha256 in the card and
checked when the base is opened; without ``--dataset`` the CLI refuses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks.train_bench import ADAPTER_SCENE_SEED
from cloud_sidecar.__main__ import EXIT_OK, EXIT_TRAIN, main
from cloud_sidecar.audio_dataset import load_dataset
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.pretrain import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    REPLAY_FILE,
    load_base_model,
    load_reference_sets,
    pretrain,
)
from devstack.__main__ import main as devstack_main
from devstack.dataset import (
    CLIP_GAIN_DB,
    INFO_FILE,
    STREAM_SEED_BASE,
    scene_segments,
    stream_spec,
    write_dataset,
)
from devstack.errors import DevstackError
from fleet_protocol.features import N_BANDS, N_FRAMES, SAMPLE_RATE, features_batch
from fleet_protocol.io.files import file_sha256
from fleet_protocol.labels import CLASS_INDEX

CLASSES3 = ("silence", "siren", "horn")


def test_written_dataset_is_folder_per_class_16_bit_wav_at_16k(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "d", per_class=2, seed=1, classes=CLASSES3)
    assert ds.files == 6
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        INFO_FILE,
        "horn",
        "silence",
        "siren",
    ]
    seconds = 0
    for wav in sorted((tmp_path / "d").glob("*/*.wav")):
        info = sf.info(str(wav))
        assert (info.format, info.subtype, info.samplerate, info.channels) == (
            "WAV",
            "PCM_16",
            SAMPLE_RATE,
            1,
        )
        assert info.frames % SAMPLE_RATE == 0 and info.frames >= SAMPLE_RATE  # whole windows
        seconds += info.frames // SAMPLE_RATE
    assert seconds == ds.windows
    assert json.loads((tmp_path / "d" / INFO_FILE).read_text())["seed"] == 1


def test_writer_round_trips_through_the_reader_segment_for_segment(tmp_path: Path) -> None:
    write_dataset(tmp_path / "d", per_class=2, seed=5, classes=CLASSES3)
    ds = load_dataset(tmp_path / "d")
    # the writer's draws, in its order: segments of streams 0, 1, ..., each written clip
    # taking the next gain, until every class has its clips
    gains = np.random.default_rng(5)
    expected: dict[str, np.ndarray] = {}
    count = dict.fromkeys(CLASSES3, 0)
    for label, audio in scene_segments(5, ("wail", "yelp"), CLASSES3):
        if count[label] < 2:
            gain = 10.0 ** (gains.uniform(*CLIP_GAIN_DB) / 20.0)
            expected[f"{label}/{label}-{count[label]:04d}.wav"] = audio * gain
            count[label] += 1
        if min(count.values()) == 2:
            break
    rows = [line.split(",") for line in ds.manifest.decode().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == sorted(expected)
    start, compared = 0, 0
    for path, _sha, cls, *_rest, n in rows:
        want = features_batch(expected[path].reshape(-1, SAMPLE_RATE).astype(np.float32))
        got = ds.x[start : start + int(n)]
        assert set(ds.y[start : start + int(n)]) == {CLASS_INDEX[cls]}
        if int(n) == len(want):  # no near-silent window dropped by the reader
            # 16-bit rounding: small on average, more in the quietest bands
            diff = np.abs(got - want)
            assert float(diff.mean()) < 0.05 and float(diff.max()) < 0.6
            compared += 1
        start += int(n)
    assert compared >= 4


def test_pretraining_streams_are_never_the_bench_or_demo_scenes() -> None:
    for seed in (0, 1, 7):
        for k in range(20):
            spec = stream_spec(seed, k, ("wail", "yelp"), CLASSES3)
            assert spec.seed >= STREAM_SEED_BASE  # bench 42.., demo 1000.., adapter bench 5e5
            assert spec.seed != ADAPTER_SCENE_SEED and spec.speech_rate == 0.0
            assert spec.siren_pattern in ("wail", "yelp")  # the two-tone hilo is left out


def test_writer_is_deterministic_and_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", per_class=1, seed=2, classes=CLASSES3)
    write_dataset(tmp_path / "b", per_class=1, seed=2, classes=CLASSES3)
    for cls in CLASSES3:
        name = f"{cls}/{cls}-0000.wav"
        assert file_sha256(tmp_path / "a" / name) == file_sha256(tmp_path / "b" / name)
    with pytest.raises(DevstackError, match="not an empty directory"):
        write_dataset(tmp_path / "a", per_class=1, classes=CLASSES3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_devstack_write_dataset_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = devstack_main(["write-dataset", "--out", str(tmp_path / "d"), "--per-class", "1"])
    assert rc == 0 and "10 clips, " in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("*/*.wav"))) == 10


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, base dir): 3 classes x 3 clips of 1-4 s, pretrained for one epoch by the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    data, base = root / "data", root / "base"
    write_dataset(data, per_class=3, seed=0, classes=CLASSES3)
    rc = main(["pretrain", "--dataset", str(data), "--out", str(base), "--epochs", "1"])
    assert rc == EXIT_OK
    return data, base


def test_pretrain_dataset_writes_a_card_naming_the_dataset(tiny_base: tuple[Path, Path]) -> None:
    data, base_dir = tiny_base
    card = json.loads((base_dir / "model_card.json").read_text())
    ds = card["dataset"]
    assert ds["layout"] == "folders" and ds["path"] == str(data.resolve())
    assert ds["manifest_sha256"] == file_sha256(base_dir / MANIFEST_FILE)
    written = sum(sf.info(str(p)).frames for p in data.glob("*/*.wav")) // SAMPLE_RATE
    assert ds["files"] == 9 and ds["windows"] + ds["skipped"]["quiet_windows"] == written
    assert set(ds["classes"]) == set(CLASSES3)
    assert ds["skipped"]["unmapped_labels"] == {} and ds["skipped"]["bad_files"] == 0
    assert card["training"]["epochs"] == 1
    assert card["held_out"]["n"] == ds["held_out_windows"] > 0
    for name in (GOLDEN_FILE, REPLAY_FILE, MANIFEST_FILE):
        assert card["sha256"][name] == file_sha256(base_dir / name)


def test_reference_sets_come_from_the_base_directory(tiny_base: tuple[Path, Path]) -> None:
    _, base_dir = tiny_base
    base = load_base_model(base_dir)
    replay, golden = load_reference_sets(base, replay_per_class=1, golden_per_class=40)
    assert replay is not None
    assert replay[0].shape == (3, N_BANDS, N_FRAMES) and sorted(replay[1]) == sorted(
        CLASS_INDEX[c] for c in CLASSES3
    )
    card = json.loads(base.card.read_text())
    assert len(golden[1]) == card["held_out"]["n"]  # fewer than 40 per class were held out
    with np.load(base.golden, allow_pickle=False) as npz:
        assert np.array_equal(npz["x"], golden[0])
    none, _ = load_reference_sets(base, replay_per_class=0, golden_per_class=1)
    assert none is None


def test_a_tampered_or_missing_reference_set_is_refused(
    tiny_base: tuple[Path, Path], tmp_path: Path
) -> None:
    _, base_dir = tiny_base
    for name in (GOLDEN_FILE, REPLAY_FILE, MANIFEST_FILE):
        copy = tmp_path / name
        shutil.copytree(base_dir, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(TrainingError, match="does not match its model card"):
            load_base_model(copy)
        (copy / name).unlink()
        with pytest.raises(TrainingError, match="missing"):
            load_base_model(copy)


def test_same_dataset_and_seed_give_the_same_model(
    tiny_base: tuple[Path, Path], tmp_path: Path
) -> None:
    data, base_dir = tiny_base
    again = pretrain(tmp_path / "again", data, epochs=1)
    card = json.loads((base_dir / "model_card.json").read_text())
    assert (
        hashlib.sha256(again.onnx_fp32.read_bytes()).hexdigest() == card["sha256"]["base.fp32.onnx"]
    )


def test_pretrain_without_a_dataset_refuses_instead_of_inventing_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["pretrain", "--out", str(tmp_path / "base")]) == EXIT_TRAIN
    assert "--dataset" in caplog.text and "devstack write-dataset" in caplog.text
    assert not (tmp_path / "base").exists()
    with pytest.raises(TrainingError, match="needs a dataset"):
        pretrain(tmp_path / "base", None)


def test_pretrain_on_a_bad_dataset_exits_with_the_training_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["pretrain", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "b")])
    assert rc == EXIT_TRAIN and "no usable audio" in caplog.text
