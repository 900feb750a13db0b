"""File and live sources: formats, every bad input's message, and the PortAudio seam."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.capture import (
    CaptureProcess,
    FileSource,
    Timeline,
    open_capture,
    open_source,
    wire,
)
from edge_daemon.capture.live import DeviceLostError, LiveSource
from edge_daemon.config import CaptureConfig, FileSourceConfig, LiveSourceConfig
from edge_daemon.errors import CaptureError

RATE = 16_000


def _tone(seconds: float, rate: int = RATE) -> npt.NDArray[np.float32]:
    t = np.arange(int(seconds * rate)) / rate
    return (0.25 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("ext", "subtype"), [("wav", "PCM_16"), ("flac", "PCM_16"), ("wav", "FLOAT")]
)
def test_file_source_reads_wav_and_flac_back_to_the_same_samples(
    tmp_path: Path, ext: str, subtype: str
) -> None:
    x = _tone(9.5)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, RATE, subtype=subtype)
    src = FileSource(FileSourceConfig(path=p))
    got = np.concatenate(list(src.blocks()))
    assert src.duration_s == pytest.approx(9.5)
    assert got.dtype == np.float32 and len(got) == len(x)
    assert np.max(np.abs(got - x)) < 1e-4


def test_file_source_resumes_at_a_block_index(tmp_path: Path) -> None:
    x = _tone(3.0)
    sf.write(tmp_path / "a.wav", x, RATE, subtype="FLOAT")
    src = FileSource(FileSourceConfig(path=tmp_path / "a.wav"), block_samples=1600)
    rest = np.concatenate(list(src.blocks(start=10)))
    np.testing.assert_array_equal(rest, x[16_000:])


def test_file_samples_carry_the_recording_start_time_plus_their_offset(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _tone(2.0), RATE)
    start = 1_764_000_000_000
    src = FileSource(FileSourceConfig(path=tmp_path / "a.wav", start_time_ms=start))
    assert src.captured_at_ms(0) == start
    assert src.captured_at_ms(RATE) == start + 1000
    assert src.captured_at_ms(RATE + 8) == start + 1000  # 0.5 ms rounds down


def test_timeline_maps_samples_through_anchors_and_shows_a_capture_gap() -> None:
    t = Timeline(max_anchors=3)
    assert abs(t.at(0) - __import__("time").time() * 1000) < 5000  # no anchor yet: now
    t.mark(0, 10_000)
    t.mark(1600, 10_100)  # contiguous: 100 ms later
    t.mark(3200, 15_000)  # frames were lost: capture resumed 4.8 s later
    assert t.at(800) == 10_050
    assert t.at(3200 + 16_000) == 16_000
    t.mark(100, 0)  # anchors only move forward
    assert t.at(3200) == 15_000
    t.mark(4800, 15_100)  # the oldest anchor is forgotten (max_anchors=3)
    assert t.at(0) == 10_100 - 100  # mapped back from the oldest kept anchor (1600 -> 10_100)


def test_wrong_rate_names_rate_and_the_fix(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _tone(1, 44_100), 44_100)
    with pytest.raises(CaptureError, match=r"44100 Hz, 1 channel.*expected 16000 Hz mono.*sox"):
        FileSource(FileSourceConfig(path=tmp_path / "a.wav"))


def test_stereo_names_channels_and_the_fix(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.flac", np.stack([_tone(1), _tone(1)], axis=1), RATE)
    with pytest.raises(CaptureError, match=r"2 channel\(s\).*sox IN -r 16000 -c 1"):
        FileSource(FileSourceConfig(path=tmp_path / "a.flac"))


def test_missing_file_says_so_and_where_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"nope\.wav: no such file; check source\.path"):
        FileSource(FileSourceConfig(path=tmp_path / "nope.wav"))


def test_corrupt_file_is_one_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "a.wav"
    p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    with pytest.raises(CaptureError, match=r"a\.wav: not a readable WAV or FLAC file"):
        FileSource(FileSourceConfig(path=p))


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="is a directory"):
        FileSource(FileSourceConfig(path=tmp_path))


def test_other_container_formats_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.aiff"
    sf.write(p, _tone(1), RATE, format="AIFF")
    with pytest.raises(CaptureError, match="AIFF audio is not supported"):
        FileSource(FileSourceConfig(path=p))


def test_missing_sound_device_names_it_and_what_to_do() -> None:
    """Real sounddevice/PortAudio: this machine has no such device (it has none at all)."""
    with pytest.raises(CaptureError) as e:
        LiveSource(LiveSourceConfig(device="no-such-usb-mic"))
    msg = str(e.value)
    assert "'no-such-usb-mic' not found" in msg
    assert "input devices:" in msg and "set source.device" in msg


class FakeStream:
    def __init__(self, script: list[str]) -> None:
        self.script = script  # per read: "ok", "overflow" or "lost"
        self.closed = False

    def read(self, frames: int) -> tuple[npt.NDArray[np.float32], bool]:
        step = self.script.pop(0) if self.script else "ok"
        if step == "lost":
            raise DeviceLostError("device unplugged")
        return np.full(frames, 0.1, dtype=np.float32), step == "overflow"

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    def __init__(self, streams: list[FakeStream | None]) -> None:
        self.streams = streams  # None: opening fails (device still gone)
        self.opened = 0

    def resolve(self, device: str | int | None) -> str:
        return "fake mic"

    def open(self, device: str | int | None, blocksize: int, latency: str) -> FakeStream:
        self.opened += 1
        s = self.streams.pop(0)
        if s is None:
            raise DeviceLostError("no such device")
        return s


def _take(it: Iterator[npt.NDArray[np.float32]], n: int) -> list[npt.NDArray[np.float32]]:
    return [next(it) for _ in range(n)]


def test_live_source_counts_overruns_and_survives_device_loss_with_backoff() -> None:
    backend = FakeBackend(
        [FakeStream(["ok", "overflow", "overflow", "lost"]), None, FakeStream([])]
    )
    cfg = LiveSourceConfig(device="fake", block_ms=100, retry_initial_s=0.05, retry_max_s=0.2)
    src = LiveSource(cfg, backend=backend, stop=threading.Event())
    it = src.blocks()
    got = _take(it, 3)
    assert [len(b) for b in got] == [1600, 1600, 1600]
    assert src.overruns == 2 and src.state == "running"
    audio: list[npt.NDArray[np.float32]] = []
    while len(audio) < 2:  # through the loss: heartbeats (empty) until the device is back
        b = next(it)
        if len(b):
            audio.append(b)
        else:
            assert src.state == "lost"
    assert src.state == "running" and src.reconnects == 1 and backend.opened == 3


def test_open_capture_puts_live_sources_in_a_capture_process() -> None:
    src = open_capture(LiveSourceConfig(device="x"), CaptureConfig())
    assert isinstance(src, CaptureProcess)
    src.close()


def test_open_capture_keeps_files_inline_by_default_and_checks_them_first(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _tone(1), RATE)
    cfg = FileSourceConfig(path=tmp_path / "a.wav")
    assert isinstance(open_capture(cfg, CaptureConfig()), FileSource)
    assert isinstance(open_source(cfg), FileSource)
    with pytest.raises(CaptureError, match="no such file"):
        open_capture(FileSourceConfig(path=tmp_path / "b.wav"), CaptureConfig(isolation="process"))


def test_wire_frames_round_trip_and_reject_garbage() -> None:
    audio = _tone(0.1)
    f = wire.Frame(wire.AUDIO, "running", 7, 123, 2, 3, 1, audio)
    g = wire.decode(wire.encode(f))
    assert (g.seq, g.dropped, g.overruns, g.reconnects, g.state) == (7, 2, 3, 1, "running")
    np.testing.assert_array_equal(g.audio, audio)
    e = wire.decode(
        wire.encode(wire.Frame(wire.ERROR, "stopped", 0, 0, 0, 0, 0, audio[:0], "boom"))
    )
    assert e.text == "boom"
    data = wire.encode(f)
    for bad in (b"", b"XXXX" + data[4:], data[:-2], data + b"\0" * 4 * wire.MAX_SAMPLES):
        with pytest.raises(ValueError):
            wire.decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_wire_decoder_raises_only_value_error_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        wire.decode(wire.MAGIC + data)
