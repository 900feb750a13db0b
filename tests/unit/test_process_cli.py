"""``edge-daemon process``: the auditor's offline run of the device pipeline on a file.

The audio is a quiet city bed with one espeak-ng sentence in the middle, so the gate
keeps windows on both sides of it and drops those near it. The classifier is a tiny
ONNX graph with the contract's input and output (mean over time, a fixed linear map,
softmax): the numbers do not matter here, the path and the output formats do.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from devstack.scene import sounds, speech
from edge_daemon.__main__ import EXIT_CAPTURE, EXIT_CONFIG, EXIT_INFERENCE, EXIT_OTHER, main
from edge_daemon.__main__ import merge_spans as merge
from edge_daemon.capture import sources
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256
from fleet_protocol.labels import CLASSES
from fleet_protocol.messages import Event
from tests.unit.test_schemas import violations

RATE = 16_000
SPEECH_AT_S = 5.0
F32 = npt.NDArray[np.float32]


def _tiny_model(path: Path, seed: int) -> Path:
    w = np.random.default_rng(seed).standard_normal((N_BANDS, len(CLASSES))).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["features"], ["m"], axes=[2], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", N_BANDS, N_FRAMES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", len(CLASSES)])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Inputs:
    wav: Path
    flac: Path
    speech: tuple[float, float]  # seconds
    model: Path
    other_model: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    d = tmp_path_factory.mktemp("process-cli")
    clip = speech.speech_clip("en", np.random.default_rng(1), d / "speech-cache")
    x = sounds.background(14 * RATE, np.random.default_rng(2))
    at = int(SPEECH_AT_S * RATE)
    x[at : at + len(clip)] += clip
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)  # the same samples in both
    sf.write(d / "in.wav", pcm, RATE, subtype="PCM_16")
    sf.write(d / "in.flac", pcm, RATE, subtype="PCM_16")
    return Inputs(
        d / "in.wav",
        d / "in.flac",
        (SPEECH_AT_S, SPEECH_AT_S + len(clip) / RATE),
        _tiny_model(d / "tiny.onnx", 0),
        _tiny_model(d / "other.onnx", 1),
    )


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["process", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _outputs(out: Path) -> tuple[list[list[float]], list[dict[str, Any]]]:
    spans = json.loads((out / "kept_segments.json").read_text())
    lines = (out / "events.jsonl").read_text().splitlines()
    return spans, [json.loads(line) for line in lines]


def _device_config(tmp: Path, model: dict[str, Any], gate: dict[str, Any] | None = None) -> Path:
    cfg: dict[str, Any] = {
        "device_id": "pi-audit-7",
        "state_dir": str(tmp / "state"),
        "broker": {"ca_cert": "ca.pem", "client_cert": "c.pem", "client_key": "k.pem"},
        "tpm": {},
        "cloud": {"unwrap_public_key": "u.pem", "ota_public_key": "o.pem"},
        "model": model,
        "source": {"type": "live"},
    }
    if gate is not None:
        cfg["gate"] = gate
    path = tmp / "device.json"
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------- spans


def test_merge_spans_joins_touching_windows_and_keeps_gaps() -> None:
    assert merge([0.0, 1.0], 1.0) == [[0.0, 2.0]]
    assert merge([5.0, 2.0, 0.0, 1.0, 6.0, 1.0], 1.0) == [[0.0, 3.0], [5.0, 7.0]]
    assert merge([0.1 + 0.2, 1.3], 1.0) == [[0.3, 2.3]]  # float noise does not split a span
    assert merge([0.0, 0.5], 1.0) == [[0.0, 1.5]]  # overlapping windows merge too
    assert merge([], 1.0) == []


# --------------------------------------------------------------------- the run


def test_wav_and_flac_give_identical_outputs_with_merged_spans_and_schema_valid_events(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for src in (inputs.wav, inputs.flac):
        out = tmp_path / src.suffix[1:]
        rc, stdout, err = _run([str(src), "--out", str(out), "--model", str(inputs.model)], capsys)
        assert rc == 0, err
        assert "windows kept" in stdout
        results[src.suffix] = {
            name: (out / name).read_bytes() for name in ("kept_segments.json", "events.jsonl")
        }
    assert results[".wav"] == results[".flac"]

    spans, events = _outputs(tmp_path / "wav")
    assert len(spans) >= 2, spans  # windows on both sides of the speech
    for (a0, a1), (b0, b1) in itertools.pairwise(spans):
        assert a0 < a1 < b0 < b1  # sorted, and touching windows were merged
    s0, s1 = inputs.speech
    assert all(end <= s0 or start >= s1 for start, end in spans), (spans, inputs.speech)
    assert all(float(s).is_integer() and float(e).is_integer() for s, e in spans)

    assert events, "no window was classified"
    starts = [e["time_ms"] / 1000 for e in events]
    assert merge(starts, 1.0) == spans  # one event per kept window, spans built from them
    sha = file_sha256(inputs.model)
    for e in events:
        assert violations(e, Event.json_schema()) == []
        assert e["device"] == "offline" and e["model_sha256"] == sha
        line = json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
        assert Event.from_bytes(line).to_bytes() == line  # the live topic's exact format


def test_start_time_ms_anchors_event_times(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = 1_763_800_000_000
    argv = [str(inputs.wav), "--model", str(inputs.model), "--out"]
    assert _run([*argv, str(tmp_path / "a")], capsys)[0] == 0
    assert _run([*argv, str(tmp_path / "b"), "--start-time-ms", str(t0)], capsys)[0] == 0
    plain, anchored = _outputs(tmp_path / "a")[1], _outputs(tmp_path / "b")[1]
    assert [e["time_ms"] + t0 for e in plain] == [e["time_ms"] for e in anchored]
    with pytest.raises(SystemExit) as exit_:
        main(["process", *argv, str(tmp_path / "c"), "--start-time-ms", "-5"])
    assert exit_.value.code == 2 and "is negative" in capsys.readouterr().err


def test_config_supplies_the_gate_policy_backend_and_model(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"base_fp32": str(inputs.other_model), "base_int8": str(inputs.model)}
    default_out, wide_out = tmp_path / "default", tmp_path / "wide"
    cfg = _device_config(tmp_path, base)
    assert _run([str(inputs.wav), "--out", str(default_out), "--config", str(cfg)], capsys)[0] == 0
    spans, events = _outputs(default_out)
    assert {e["device"] for e in events} == {"pi-audit-7"}
    assert {e["model_sha256"] for e in events} == {file_sha256(inputs.model)}  # int8 default

    fp32 = _device_config(
        tmp_path,
        base | {"backend": {"type": "onnxruntime", "precision": "fp32"}},
        gate={"margin_before_s": 2.5},
    )
    assert _run([str(inputs.wav), "--out", str(wide_out), "--config", str(fp32)], capsys)[0] == 0
    wide_spans, wide_events = _outputs(wide_out)
    assert {e["model_sha256"] for e in wide_events} == {file_sha256(inputs.other_model)}
    covered = sum(b - a for a, b in spans)
    assert sum(b - a for a, b in wide_spans) < covered  # wider guard margins keep less

    override = tmp_path / "override"
    argv = [str(inputs.wav), "--out", str(override), "--config", str(cfg)]
    assert _run([*argv, "--model", str(inputs.other_model)], capsys)[0] == 0
    assert {e["model_sha256"] for e in _outputs(override)[1]} == {file_sha256(inputs.other_model)}


# ------------------------------------------------------------------ bad inputs


def _tone(seconds: float, rate: int = RATE) -> F32:
    t = np.arange(int(seconds * rate)) / rate
    return (0.25 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _bad_input(kind: str, d: Path) -> Path:
    p = d / "in.wav"
    if kind == "missing":
        return d / "nope.wav"
    if kind == "directory":
        return d
    if kind == "corrupt":
        p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    elif kind == "zero-bytes":
        p.write_bytes(b"")
    elif kind == "no-samples":
        sf.write(p, np.zeros(0, dtype=np.float32), RATE)
    elif kind == "too-short":
        sf.write(p, _tone(0.5), RATE)
    elif kind == "rate":
        sf.write(p, _tone(2, 44_100), 44_100)
    elif kind == "stereo":
        p = d / "in.flac"
        sf.write(p, np.stack([_tone(2), _tone(2)], axis=1), RATE)
    elif kind == "aiff":
        p = d / "in.aiff"
        sf.write(p, _tone(2), RATE, format="AIFF")
    elif kind == "oversized":
        with open(p, "wb") as f:  # sparse: no disk used
            f.truncate(sources.MAX_FILE_BYTES + 1)
    return p


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", r"nope\.wav: no such file; give the path of a 16 kHz mono WAV or FLAC"),
        ("directory", r"is a directory; give the path of a WAV or FLAC file"),
        ("corrupt", r"in\.wav: not a readable WAV or FLAC file .*sox IN -r 16000 -c 1"),
        ("zero-bytes", r"in\.wav: not a readable WAV or FLAC file"),
        ("no-samples", r"0\.00 s of audio, shorter than one 1 s window.*give a longer"),
        ("too-short", r"0\.50 s of audio, shorter than one 1 s window"),
        ("rate", r"44100 Hz, 1 channel\(s\); expected 16000 Hz mono; convert it with: sox"),
        ("stereo", r"in\.flac: 16000 Hz, 2 channel\(s\); expected 16000 Hz mono; convert"),
        ("aiff", r"AIFF audio is not supported; convert it with: sox"),
        ("oversized", r"bytes exceeds the \d+ byte cap; split it"),
    ],
)
def test_each_bad_input_file_is_one_line_naming_it_and_the_fix(
    kind: str,
    message: str,
    inputs: Inputs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = _bad_input(kind, tmp_path)
    out = tmp_path / "out"
    rc, _, err = _run([str(src), "--out", str(out), "--model", str(inputs.model)], capsys)
    assert rc == EXIT_CAPTURE
    _assert_one_line(err, message)
    assert not out.exists()  # refused before anything was written


def _assert_one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edge-daemon process: error: ")
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("config-missing", EXIT_CONFIG, r"cannot read config .*nope\.json"),
        ("config-not-json", EXIT_CONFIG, r"not JSON: line 1 column"),
        ("config-invalid", EXIT_CONFIG, r"invalid configuration: model\.backend: Input tag 'x'"),
        (
            "config-two-errors",
            EXIT_CONFIG,
            r"invalid configuration: device_id: [^;]+; model\.threads: ",
        ),
        ("gate-policy", EXIT_CONFIG, r"gate\.threshold: Input should be less than 1"),
        ("model-missing", EXIT_INFERENCE, r"cannot read model .*none\.onnx"),
        ("model-corrupt", EXIT_INFERENCE, r"cannot load model .*junk\.onnx"),
        ("hailo-absent", EXIT_INFERENCE, r"HailoRT .* is not installed"),
        ("out-is-a-file", EXIT_OTHER, r"--out .*: cannot write there .*writable directory"),
    ],
)
def test_bad_config_model_or_out_is_one_line_with_its_exit_code(
    kind: str,
    code: int,
    message: str,
    inputs: Inputs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = {"base_fp32": str(inputs.model), "base_int8": str(inputs.model)}
    out = tmp_path / "out"
    extra: list[str] = ["--model", str(inputs.model)]
    if kind == "config-missing":
        extra = ["--config", str(tmp_path / "nope.json")]
    elif kind == "config-not-json":
        (tmp_path / "c.json").write_text("{device_id: x}")
        extra = ["--config", str(tmp_path / "c.json")]
    elif kind == "config-invalid":
        extra = ["--config", str(_device_config(tmp_path, model | {"backend": {"type": "x"}}))]
    elif kind == "config-two-errors":
        path = _device_config(tmp_path, model | {"threads": 0})
        raw = json.loads(path.read_text()) | {"device_id": "Bad Id"}
        path.write_text(json.dumps(raw))
        extra = ["--config", str(path)]
    elif kind == "gate-policy":
        extra = ["--config", str(_device_config(tmp_path, model, gate={"threshold": 2}))]
    elif kind == "model-missing":
        extra = ["--model", str(tmp_path / "none.onnx")]
    elif kind == "model-corrupt":
        (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 50)
        extra = ["--model", str(tmp_path / "junk.onnx")]
    elif kind == "hailo-absent":
        hailo = {"type": "hailo", "hef": str(tmp_path / "m.hef")}
        extra = ["--config", str(_device_config(tmp_path, model | {"backend": hailo}))]
    elif kind == "out-is-a-file":
        out.write_text("not a directory")
    rc, _, err = _run([str(inputs.wav), "--out", str(out), *extra], capsys)
    assert rc == code
    _assert_one_line(err, message)
    if kind != "out-is-a-file":
        assert not (out / "events.jsonl").exists()


def test_model_or_config_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["process", str(tmp_path / "a.wav"), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "give --model (an ONNX classifier) or --config" in capsys.readouterr().err


def test_the_real_command_prints_one_line_and_no_traceback(inputs: Inputs, tmp_path: Path) -> None:
    src = _bad_input("stereo", tmp_path)
    argv = [sys.executable, "-m", "edge_daemon", "process", str(src), "--out", str(tmp_path / "o")]
    r = subprocess.run(
        [*argv, "--model", str(inputs.model)], capture_output=True, text=True, check=False
    )
    assert r.returncode == EXIT_CAPTURE
    _assert_one_line(r.stderr, r"2 channel\(s\); expected 16000 Hz mono")
