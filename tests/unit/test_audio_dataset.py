"""The pretraining dataset reader on small generated fixtures, in every layout.

Each fixture is a few short WAV/FLAC files written with soundfile into a temporary
directory: folder per class, ESC-50's and UrbanSound8K's CSV layouts, the generic
``path,label`` CSV. Then the inputs an operator's set can get wrong: nothing usable, one
class, a corrupt or missing file, another sample rate, stereo, a path leaving the
directory, a label no map knows, files and CSVs over their caps.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cloud_sidecar.__main__ import LAYOUTS as CLI_LAYOUTS
from cloud_sidecar.audio_dataset import (
    LAYOUTS,
    DatasetConfig,
    detect_layout,
    load_dataset,
    scan_dataset,
    split_held_out,
)
from cloud_sidecar.audio_windows import WindowRule, cut_windows, decode
from cloud_sidecar.class_maps import ESC50_MAP, URBANSOUND8K_MAP
from cloud_sidecar.errors import DatasetError, TrainingError
from fleet_protocol.features import N_BANDS, N_FRAMES, SAMPLE_RATE, features_batch
from fleet_protocol.labels import CLASS_INDEX, CLASSES

SR = SAMPLE_RATE


def tone(
    seconds: float, rate: int = SR, hz: float = 440.0, level: float = 0.3, seed: int = 0
) -> np.ndarray:
    """A tone with a little noise (float32, mono)."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n) * 0.01
    return (level * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def wav(path: Path, audio: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    sf.write(path, audio, rate, subtype=subtype, format=fmt)
    return path


def folders(root: Path, spec: dict[str, list[float]]) -> Path:
    """``root/<class>/<class>-k.wav`` with the given clip lengths in seconds."""
    for cls, lengths in spec.items():
        for k, seconds in enumerate(lengths):
            hz = 300.0 + 150.0 * CLASSES.index(cls) if cls in CLASSES else 500.0
            wav(root / cls / f"{cls}-{k}.wav", tone(seconds, hz=hz, seed=k))
    return root


def two_classes(root: Path) -> Path:
    return folders(root, {"siren": [2.0, 2.0, 3.0], "horn": [2.0, 2.0, 1.0]})


def esc50(root: Path, rows: list[tuple[str, int, str]]) -> Path:
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (name, fold, category) in enumerate(rows):
        lines.append(f"{name},{fold},{i},{category},False,{i},A")
        wav(root / "audio" / name, tone(5.0, hz=400.0 + 10 * i, seed=i))
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def urbansound8k(root: Path, rows: list[tuple[str, int, str]]) -> Path:
    lines = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    for i, (name, fold, cls) in enumerate(rows):
        lines.append(f"{name},{100 + i},0.0,4.0,1,{fold},{i % 10},{cls}")
        wav(root / "audio" / f"fold{fold}" / name, tone(4.0, hz=500.0 + 10 * i, seed=i))
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text("\n".join(lines) + "\n")
    return root


def manifest(root: Path, rows: list[tuple[str, str]], extra: str = "") -> Path:
    lines = ["path,label" + extra] + [f"{p},{label}" for p, label in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def per_file_split(ds_manifest: bytes) -> list[list[str]]:
    return [line.split(",") for line in ds_manifest.decode().splitlines()[1:]]


# --------------------------------------------------------------------------- layouts


def test_folder_layout_gives_one_window_per_second_with_the_folder_as_class(
    tmp_path: Path,
) -> None:
    ds = load_dataset(two_classes(tmp_path / "d"))
    assert ds.x.shape == (12, N_BANDS, N_FRAMES) and ds.x.dtype == np.float32
    assert (ds.y == CLASS_INDEX["siren"]).sum() == 7 and (ds.y == CLASS_INDEX["horn"]).sum() == 5
    assert ds.summary["layout"] == "folders"
    assert ds.summary["classes"]["siren"] == {
        "files": 3,
        "windows": 7,
        "held_out_windows": int((ds.held_out & (ds.y == CLASS_INDEX["siren"])).sum()),
    }
    assert ds.manifest_sha256 == hashlib.sha256(ds.manifest).hexdigest()


def test_features_are_the_contract_log_mel_of_the_audio(tmp_path: Path) -> None:
    audio = tone(1.0, hz=700.0)
    wav(tmp_path / "d" / "siren" / "a.wav", audio, subtype="FLOAT")
    wav(tmp_path / "d" / "horn" / "b.wav", tone(1.0, hz=400.0), subtype="FLOAT")
    wav(tmp_path / "d" / "horn" / "c.wav", tone(1.0, hz=410.0), subtype="FLOAT")
    ds = load_dataset(tmp_path / "d")
    siren = ds.x[ds.y == CLASS_INDEX["siren"]]
    assert np.allclose(siren[0], features_batch(audio[None, :])[0], atol=1e-5)


def test_flac_files_are_read_like_wav(tmp_path: Path) -> None:
    root = tmp_path / "d"
    wav(root / "rain" / "a.flac", tone(2.0, hz=3000.0))
    wav(root / "wind" / "b.wav", tone(2.0, hz=200.0))
    wav(root / "wind" / "c.flac", tone(1.0, hz=210.0))
    ds = load_dataset(root)
    assert ds.summary["classes"]["rain"]["windows"] == 2
    assert ds.summary["classes"]["wind"]["files"] == 2


def test_esc50_layout_maps_categories_and_holds_out_the_highest_fold(tmp_path: Path) -> None:
    rows = [
        ("1-a.wav", 1, "dog"),
        ("1-b.wav", 1, "car_horn"),
        ("2-a.wav", 2, "dog"),
        ("5-a.wav", 5, "dog"),
        ("5-b.wav", 5, "car_horn"),
        ("1-c.wav", 1, "rooster"),  # no counterpart: excluded
        ("1-d.wav", 1, "unicorn"),  # not an ESC-50 category: unmapped
    ]
    root = esc50(tmp_path / "esc", rows)
    assert detect_layout(root) == "esc50"
    ds = load_dataset(root)
    assert ds.summary["layout"] == "esc50"
    assert set(ds.summary["classes"]) == {"dog_bark", "horn"}
    assert ds.summary["skipped"]["excluded_labels"] == {"rooster": 1}
    assert ds.summary["skipped"]["unmapped_labels"] == {"unicorn": 1}
    assert ds.summary["split"] == "folds [5] held out"
    assert ds.held_out.sum() == 10  # the two fold-5 clips, 5 windows each
    for path, _sha, _cls, _label, fold, split, _n in per_file_split(ds.manifest):
        assert path.startswith("audio/") and (split == "held_out") == (fold == "5")


def test_esc50_strict_refuses_a_category_no_map_knows(tmp_path: Path) -> None:
    root = esc50(tmp_path / "esc", [("1-a.wav", 1, "dog"), ("2-a.wav", 2, "unicorn")])
    with pytest.raises(DatasetError, match=r"'unicorn'.*--class-map"):
        load_dataset(root, cfg=DatasetConfig(strict=True))


def test_urbansound8k_layout_reads_fold_folders_and_skips_speech_classes(tmp_path: Path) -> None:
    rows = [
        ("100-0-0-0.wav", 1, "siren"),
        ("101-0-0-0.wav", 1, "jackhammer"),
        ("102-0-0-0.wav", 2, "siren"),
        ("103-0-0-0.wav", 2, "drilling"),
        ("104-0-0-0.wav", 1, "children_playing"),
    ]
    root = urbansound8k(tmp_path / "us8k", rows)
    assert detect_layout(root) == "urbansound8k"
    ds = load_dataset(root, cfg=DatasetConfig(strict=True))  # every US8K class is known
    assert set(ds.summary["classes"]) == {"siren", "construction"}
    assert ds.summary["skipped"]["excluded_labels"] == {"children_playing": 1}
    paths = [r[0] for r in per_file_split(ds.manifest)]
    assert "audio/fold2/103-0-0-0.wav" in paths
    assert ds.held_out.sum() == 8  # fold 2: two clips of 4 s
    chosen = load_dataset(root, cfg=DatasetConfig(held_out_folds=(1,)))
    assert chosen.held_out.sum() == 8 and chosen.summary["split"] == "folds [1] held out"


def test_generic_csv_layout_with_an_operator_class_map(tmp_path: Path) -> None:
    root = tmp_path / "csv"
    wav(root / "clips" / "a.wav", tone(2.0))
    wav(root / "clips" / "b.flac", tone(2.0, hz=900.0))
    wav(root / "clips" / "c.wav", tone(2.0, hz=950.0))
    wav(root / "clips" / "d.wav", tone(2.0, hz=990.0))
    manifest(
        root,
        [
            ("clips/a.wav", "car_horn"),
            ("clips/b.flac", "ambulance"),
            ("clips/c.wav", "ambulance"),
            ("clips/d.wav", "music"),
        ],
    )
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"car_horn": "horn", "ambulance": "siren", "music": None}))
    ds = load_dataset(root, "csv", cmap)
    assert ds.summary["classes"]["horn"]["windows"] == 2
    assert ds.summary["classes"]["siren"]["files"] == 2
    assert ds.summary["skipped"]["excluded_labels"] == {"music": 1}
    assert ds.summary["class_map_sha256"] == hashlib.sha256(cmap.read_bytes()).hexdigest()


def test_generic_csv_may_carry_folds(tmp_path: Path) -> None:
    root = tmp_path / "csv"
    for name in ("a", "b", "c", "d"):
        wav(root / f"{name}.wav", tone(1.0, hz=300.0 + ord(name)))
    (root / "manifest.csv").write_text(
        "path,label,fold\na.wav,siren,1\nb.wav,horn,1\nc.wav,siren,2\nd.wav,horn,2\n"
    )
    ds = load_dataset(root)
    assert ds.summary["split"] == "folds [2] held out" and ds.held_out.sum() == 2


def test_auto_detects_each_layout(tmp_path: Path) -> None:
    assert detect_layout(two_classes(tmp_path / "f")) == "folders"
    assert detect_layout(manifest(tmp_path / "c", [])) == "csv"
    assert set(LAYOUTS) == set(CLI_LAYOUTS)


def test_builtin_maps_name_only_model_classes_or_null() -> None:
    assert len(ESC50_MAP) == 50 and len(URBANSOUND8K_MAP) == 10
    for value in [*ESC50_MAP.values(), *URBANSOUND8K_MAP.values()]:
        assert value is None or value in CLASSES
    assert URBANSOUND8K_MAP["children_playing"] is None  # speech is never trained on


# --------------------------------------------------------------------------- audio


def test_another_sample_rate_is_resampled_not_refused(tmp_path: Path) -> None:
    audio = tone(2.0, rate=44_100, hz=1000.0)
    mono, rate, channels = decode(wav(tmp_path / "a.wav", audio, 44_100).read_bytes(), 60.0)
    assert (rate, channels) == (44_100, 1) and len(mono) == 2 * SR
    spectrum = np.abs(np.fft.rfft(mono))
    assert abs(np.argmax(spectrum) * SR / len(mono) - 1000.0) < 2.0
    root = tmp_path / "d"
    wav(root / "siren" / "a.wav", audio, 44_100)
    wav(root / "siren" / "b.wav", tone(1.0, rate=8_000, hz=1000.0), 8_000)
    wav(root / "horn" / "c.wav", tone(2.0, rate=22_050, hz=400.0), 22_050)
    wav(root / "horn" / "d.wav", tone(1.0, hz=410.0))
    assert load_dataset(root).summary["windows"] == 6


def test_stereo_is_mixed_down_to_the_mean_of_its_channels(tmp_path: Path) -> None:
    left = tone(1.0, level=0.4)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    mono, _, channels = decode(wav(tmp_path / "s.wav", stereo, subtype="FLOAT").read_bytes(), 60.0)
    assert channels == 2
    assert np.allclose(mono, left / 2, atol=1e-6)


def test_a_tail_of_half_a_second_becomes_a_window_a_shorter_one_does_not() -> None:
    rule = WindowRule()
    assert cut_windows(tone(1.6), silence=False, rule=rule)[0].shape == (2, SR)
    assert cut_windows(tone(1.3), silence=False, rule=rule)[0].shape == (1, SR)
    short = tone(0.6)
    (win,), _ = cut_windows(short, silence=False, rule=rule)
    assert np.array_equal(win[: len(short)], short)  # completed by repeating, not zeros
    assert np.array_equal(win[len(short) : 2 * len(short)], short[: SR - len(short)])
    assert cut_windows(tone(0.2), silence=False, rule=rule)[0].shape == (0, SR)


def test_near_silent_windows_are_dropped_except_for_the_silence_class(tmp_path: Path) -> None:
    loud, room = tone(1.0, level=0.3), tone(1.0, level=0.3) * 10 ** (-45 / 20)
    audio = np.concatenate([loud, room, np.zeros(SR, np.float32)])
    windows, quiet = cut_windows(audio, silence=False, rule=WindowRule())
    assert len(windows) == 1 and quiet == 2  # 45 dB under the loudest; digital silence
    windows, quiet = cut_windows(audio, silence=True, rule=WindowRule())
    assert len(windows) == 3 and quiet == 0
    root = tmp_path / "d"
    wav(root / "dog_bark" / "a.wav", audio, subtype="FLOAT")
    wav(root / "silence" / "b.wav", audio, subtype="FLOAT")
    wav(root / "silence" / "c.wav", audio, subtype="FLOAT")
    wav(root / "dog_bark" / "d.wav", loud)
    ds = load_dataset(root)
    assert ds.summary["classes"]["dog_bark"]["windows"] == 2
    assert ds.summary["classes"]["silence"]["windows"] == 6
    assert ds.summary["skipped"]["quiet_windows"] == 2


# --------------------------------------------------------------------------- split


def test_split_is_per_file_by_path_hash_and_stable_as_files_are_added(tmp_path: Path) -> None:
    spec = {"siren": [1.0] * 20, "horn": [2.0] * 20}
    ds = load_dataset(folders(tmp_path / "d", spec))
    rows = per_file_split(ds.manifest)
    # Windows are in manifest order: a file's windows all carry its split.
    start = 0
    for row in rows:
        n = int(row[6])
        assert set(ds.held_out[start : start + n]) == {row[5] == "held_out"}
        start += n
    assert 0 < ds.held_out.sum() < len(ds.held_out)
    before = {r[0]: r[5] for r in rows}
    wav(tmp_path / "d" / "siren" / "new.wav", tone(1.0))
    after = {r[0]: r[5] for r in per_file_split(load_dataset(tmp_path / "d").manifest)}
    assert {k: after[k] for k in before} == before
    assert (
        load_dataset(tmp_path / "d").manifest_sha256
        == hashlib.sha256(load_dataset(tmp_path / "d").manifest).hexdigest()
    )


def test_every_class_with_two_files_has_one_on_each_side(tmp_path: Path) -> None:
    index = scan_dataset(folders(tmp_path / "d", {"siren": [1.0, 1.0], "horn": [1.0, 1.0]}))
    held, _ = split_held_out(index.items, DatasetConfig())
    for cls in ("siren", "horn"):
        sides = {h for it, h in zip(index.items, held, strict=True) if it.cls == cls}
        assert sides == {True, False}


def test_the_manifest_hash_changes_with_audio_bytes_and_labels(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "d")
    first = load_dataset(root).manifest_sha256
    assert load_dataset(root).manifest_sha256 == first
    wav(root / "siren" / "siren-0.wav", tone(2.0, hz=1234.0))
    assert load_dataset(root).manifest_sha256 != first


# --------------------------------------------------------------------------- bad input


def test_an_empty_dataset_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable audio"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    root = folders(tmp_path / "d", {"siren": [2.0, 2.0, 2.0], "unicorn": [1.0]})
    with pytest.raises(DatasetError, match="at least two"):
        load_dataset(root)


def test_a_corrupt_file_is_named_or_skipped_and_counted_by_policy(tmp_path: Path) -> None:
    root = folders(tmp_path / "d", {"siren": [1.0] * 10, "horn": [1.0] * 10})
    bad = root / "horn" / "broken.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(200))
    with pytest.raises(DatasetError, match=r"broken\.wav.*--skip-bad-files") as e:
        load_dataset(root)
    assert e.value.path == str(bad.resolve())
    ds = load_dataset(root, cfg=DatasetConfig(bad_files="skip", max_bad_fraction=0.1))
    assert ds.summary["skipped"]["bad_files"] == 1
    assert ds.summary["skipped"]["bad_file_examples"][0].startswith("horn/broken.wav: ")
    assert "horn/broken.wav" not in ds.manifest.decode()
    with pytest.raises(DatasetError, match="1 of 21 files are bad"):
        load_dataset(root, cfg=DatasetConfig(bad_files="skip", max_bad_fraction=0.01))


def test_a_file_that_is_not_wav_or_flac_is_a_bad_file(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "d")
    sf.write(root / "horn" / "x.wav", tone(1.0), SR, format="OGG", subtype="VORBIS")
    with pytest.raises(DatasetError, match=r"x\.wav: format OGG is not WAV or FLAC"):
        load_dataset(root)


def test_a_csv_path_leaving_the_directory_is_refused_even_when_skipping(tmp_path: Path) -> None:
    wav(tmp_path / "outside.wav", tone(1.0))
    for rows in (
        [("../outside.wav", "siren")],
        [(str(tmp_path / "outside.wav"), "siren")],
        [("a/../../outside.wav", "siren")],
    ):
        root = manifest(tmp_path / "csv", rows)
        with pytest.raises(DatasetError, match="outside the dataset directory"):
            load_dataset(root, cfg=DatasetConfig(bad_files="skip"))
    esc = esc50(tmp_path / "esc", [("1-a.wav", 1, "dog")])
    (esc / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category\n../../outside.wav,1,0,dog\n"
    )
    with pytest.raises(DatasetError, match="outside the dataset directory"):
        load_dataset(esc)


def test_a_symlink_leaving_the_directory_is_refused(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "d")
    secret = wav(tmp_path / "elsewhere" / "secret.wav", tone(1.0))
    (root / "siren" / "link.wav").symlink_to(secret)
    with pytest.raises(DatasetError, match="outside the dataset directory"):
        load_dataset(root)


def test_a_label_no_map_knows_is_skipped_and_counted_or_refused_when_strict(
    tmp_path: Path,
) -> None:
    root = folders(tmp_path / "d", {"siren": [1.0, 1.0], "horn": [1.0, 1.0], "unicorn": [1.0]})
    ds = load_dataset(root)
    assert ds.summary["skipped"]["unmapped_labels"] == {"unicorn": 1}
    with pytest.raises(DatasetError, match="'unicorn'") as e:
        load_dataset(root, cfg=DatasetConfig(strict=True))
    assert "unicorn" in e.value.path
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"unicorn": None}))
    assert load_dataset(root, class_map=cmap, cfg=DatasetConfig(strict=True)).summary["files"] == 4


def test_a_class_map_naming_no_model_class_is_refused(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "d")
    for text, match in (
        ('{"horn": "trumpet"}', "not a model class"),
        ("[1, 2]", "JSON object"),
        ("{not json", "not UTF-8 JSON"),
        ('{"horn": "' + "x" * 2000 + '"}', "exceeds"),
    ):
        cmap = tmp_path / "map.json"
        cmap.write_text(text)
        with pytest.raises(DatasetError, match=match) as e:
            load_dataset(root, class_map=cmap, cfg=DatasetConfig(max_class_map_bytes=1024))
        assert e.value.path == str(cmap)


def test_an_oversized_csv_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    root = manifest(tmp_path / "csv", [(f"clip-{i}.wav", "siren") for i in range(200)])
    with pytest.raises(DatasetError, match="over the 1024-byte cap"):
        load_dataset(root, cfg=DatasetConfig(max_csv_bytes=1024))


def test_a_missing_audio_file_named_by_the_csv_is_named(tmp_path: Path) -> None:
    root = urbansound8k(tmp_path / "us8k", [("a.wav", 1, "siren"), ("b.wav", 2, "siren")])
    (root / "audio" / "fold2" / "b.wav").unlink()
    with pytest.raises(DatasetError, match=r"fold2/b\.wav: missing"):
        load_dataset(root)


def test_a_malformed_csv_row_is_named_by_line(tmp_path: Path) -> None:
    root = esc50(tmp_path / "esc", [("1-a.wav", 1, "dog")])
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-a.wav,one,0,dog\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv:2: fold 'one'"):
        load_dataset(root)
    (root / "meta" / "esc50.csv").write_text("name,category\n1-a.wav,dog\n")
    with pytest.raises(DatasetError, match="lacks"):
        load_dataset(root)


def test_files_over_their_caps_are_refused(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "d")
    with pytest.raises(DatasetError, match="byte cap"):
        load_dataset(root, cfg=DatasetConfig(max_file_bytes=40_000))
    with pytest.raises(DatasetError, match="per-file cap"):
        load_dataset(root, cfg=DatasetConfig(max_seconds_per_file=1.5))
    with pytest.raises(DatasetError, match="more than 3 entries"):
        load_dataset(root, cfg=DatasetConfig(max_files=3))
    with pytest.raises(DatasetError, match="more than 5 windows"):
        load_dataset(root, cfg=DatasetConfig(max_windows=5))


def test_dataset_errors_are_training_errors_for_the_cli_exit_code() -> None:
    assert issubclass(DatasetError, TrainingError)
