"""Live capture's recovery paths, against fakes: a device missing at start, and PortAudio
re-initialised after a failure.

``LiveSource`` is driven through a fake ``StreamBackend``; ``SoundDeviceBackend`` is
given a fake ``sounddevice`` module (put in ``sys.modules`` before it is built) that,
like PortAudio, lists devices only when it initialises. The real PortAudio path is
tested through ALSA in tests/integration/test_live_capture_alsa.py.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edge_daemon.capture.live import DeviceLostError, LiveSource, SoundDeviceBackend
from edge_daemon.config import LiveSourceConfig
from edge_daemon.errors import CaptureError
from tests.unit.test_capture_sources import FakeBackend, FakeStream

F32 = npt.NDArray[np.float32]
CFG = LiveSourceConfig(device="usb mic", block_ms=100, retry_initial_s=0.02, retry_max_s=0.05)


class AbsentAtFirst(FakeBackend):
    """A device PortAudio does not see for the first ``missing`` resolves."""

    def __init__(self, missing: int, streams: list[FakeStream | None]) -> None:
        super().__init__(streams)
        self.missing = missing
        self.resolves = 0

    def resolve(self, device: str | int | None) -> str:
        self.resolves += 1
        if self.resolves <= self.missing:
            raise CaptureError(f"input device {device!r} not found; input devices: none")
        return "USB mic (hw:2,0)"


def _next_audio(it: Iterator[F32], src: LiveSource, limit: int = 200) -> tuple[F32, int]:
    """The next non-empty block, and how many heartbeats came before it (all while lost)."""
    for beats in range(limit):
        b = next(it)
        if len(b):
            return b, beats
        assert src.state == "lost"
    raise AssertionError("no audio")


def test_retry_missing_treats_a_device_absent_at_start_as_lost_until_it_appears() -> None:
    backend = AbsentAtFirst(missing=3, streams=[FakeStream([])])
    src = LiveSource(CFG, backend=backend, stop=threading.Event(), retry_missing=True)
    assert src.state == "lost" and src.device_name == "usb mic"
    block, beats = _next_audio(src.blocks(), src)
    assert beats >= 1  # heartbeats while it was missing: alive, no audio
    assert len(block) == 1600 and src.state == "running"
    assert src.reconnects == 1 and backend.resolves == 4 and backend.opened == 1
    assert src.device_name == "USB mic (hw:2,0)"


def test_a_device_lost_after_a_retried_start_comes_back_again() -> None:
    backend = AbsentAtFirst(missing=1, streams=[FakeStream(["ok", "lost"]), None, FakeStream([])])
    src = LiveSource(CFG, backend=backend, stop=threading.Event(), retry_missing=True)
    it = src.blocks()
    _next_audio(it, src)  # missing at start, then its "ok" read
    assert src.reconnects == 1
    _, beats = _next_audio(it, src)  # lost, one failed reopen, back
    assert beats >= 1 and src.reconnects == 2 and backend.opened == 3
    assert backend.resolves == 2  # a name once resolved is not resolved again


def test_without_retry_missing_a_device_absent_at_start_is_one_capture_error() -> None:
    backend = AbsentAtFirst(missing=1, streams=[])
    with pytest.raises(CaptureError, match=r"input device 'usb mic' not found"):
        LiveSource(CFG, backend=backend, stop=threading.Event())
    assert backend.opened == 0


def test_stop_ends_a_source_that_waits_for_a_missing_device() -> None:
    stop = threading.Event()
    backend = AbsentAtFirst(missing=10**9, streams=[])
    src = LiveSource(CFG, backend=backend, stop=stop, retry_missing=True)
    it = src.blocks()
    assert len(next(it)) == 0
    stop.set()
    assert list(it) == [] and src.state == "stopped" and backend.opened == 0


# ------------------------------------------------- SoundDeviceBackend, fake PortAudio


class FakeSounddevice(types.ModuleType):
    """``sounddevice`` as far as the backend uses it; PortAudio's device list is a
    snapshot of ``world`` taken at ``_initialize`` (as ``Pa_Initialize`` does)."""

    class PortAudioError(Exception):
        pass

    def __init__(self, world: list[str]) -> None:
        super().__init__("sounddevice")
        self.world = world
        self.listed = list(world)
        self.terminated = self.initialized = 0
        self.streams: list[FakeSdStream] = []

    def _terminate(self) -> None:
        self.terminated += 1

    def _initialize(self) -> None:
        self.initialized += 1
        self.listed = list(self.world)

    def query_devices(self, device: Any = None, kind: str | None = None) -> Any:
        infos = [{"name": n, "max_input_channels": 1} for n in self.listed]
        if device is None and kind is None:
            return infos
        for i, info in enumerate(infos):
            if device == i or (isinstance(device, str) and device in info["name"]):
                return info
        raise ValueError(f"No input device matching {device!r}")

    def check_input_settings(self, **kw: Any) -> None:
        pass

    def InputStream(self, device: Any = None, **kw: Any) -> FakeSdStream:
        if not any(isinstance(device, str) and device in n for n in self.listed):
            raise self.PortAudioError(f"Error opening InputStream: no device {device!r}")
        if device not in " ".join(self.world):  # listed, but unplugged since
            raise self.PortAudioError("Error starting stream: Unanticipated host error")
        s = FakeSdStream(self)
        self.streams.append(s)
        return s


class FakeSdStream:
    def __init__(self, sd: FakeSounddevice) -> None:
        self.sd, self.reads_left, self.closed = sd, 2, False

    def start(self) -> None:
        pass

    def read(self, frames: int) -> tuple[F32, bool]:
        if self.reads_left == 0:
            raise self.sd.PortAudioError("Stream is stopped: device unplugged")
        self.reads_left -= 1
        return np.zeros((frames, 1), dtype=np.float32), False

    def abort(self, ignore_errors: bool = True) -> None:
        pass

    def close(self, ignore_errors: bool = True) -> None:
        self.closed = True


@pytest.fixture
def sd(monkeypatch: pytest.MonkeyPatch) -> FakeSounddevice:
    fake = FakeSounddevice(["bcm2835 headphones", "USB mic: Audio (hw:1,0)"])
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    return fake


def test_backend_reinitialises_portaudio_once_after_a_lost_stream_then_finds_the_device(
    sd: FakeSounddevice,
) -> None:
    backend = SoundDeviceBackend()
    assert backend.sd is sd
    assert backend.resolve("USB mic") == "USB mic: Audio (hw:1,0)"
    stream = backend.open("USB mic", 1600, "high")
    stream.read(1600)
    stream.read(1600)
    with pytest.raises(DeviceLostError, match="unplugged"):
        stream.read(1600)
    stream.close()
    assert (sd.terminated, sd.initialized) == (0, 0)  # nothing failed before: no re-list
    sd.world = ["USB mic: Audio (hw:3,0)", "bcm2835 headphones"]  # back, another card/index
    assert backend.resolve("USB mic") == "USB mic: Audio (hw:3,0)"
    assert (sd.terminated, sd.initialized) == (1, 1)
    backend.open("USB mic", 1600, "high").close()
    assert (sd.terminated, sd.initialized) == (1, 1)  # once per failure, not per call


def test_backend_reinitialises_before_reopening_a_lost_device(sd: FakeSounddevice) -> None:
    backend = SoundDeviceBackend()
    sd.world = ["bcm2835 headphones"]  # unplugged; PortAudio's list still shows it
    with pytest.raises(DeviceLostError, match="Unanticipated host error"):
        backend.open("USB mic", 1600, "high")
    assert (sd.terminated, sd.initialized) == (0, 0)
    with pytest.raises(DeviceLostError, match="no device 'USB mic'"):
        backend.open("USB mic", 1600, "high")  # re-listed first: now it is gone from the list
    assert (sd.terminated, sd.initialized) == (1, 1)
    sd.world = ["USB mic: Audio (hw:1,0)"]
    backend.open("USB mic", 1600, "high").close()
    assert (sd.terminated, sd.initialized) == (2, 2)


def test_a_failed_reinitialisation_is_retried_and_resolve_reports_it_as_capture_error(
    sd: FakeSounddevice,
) -> None:
    backend = SoundDeviceBackend()
    with pytest.raises(CaptureError, match="'no such mic' not found"):
        backend.resolve("no such mic")  # a failed resolve also marks the list stale

    def broken() -> None:
        sd.initialized += 1
        raise sd.PortAudioError("PaErrorCode -9999")

    sd._initialize = broken  # type: ignore[method-assign]
    with pytest.raises(CaptureError, match="PortAudio could not re-list devices"):
        backend.resolve("USB mic")
    del sd._initialize  # the class's again
    assert backend.resolve("USB mic") == "USB mic: Audio (hw:1,0)"  # still stale: retried
    assert (sd.terminated, sd.initialized) == (2, 2)


def test_live_source_on_the_sounddevice_backend_recovers_with_one_reinitialisation(
    sd: FakeSounddevice,
) -> None:
    cfg = CFG.model_copy(update={"device": "USB mic"})
    src = LiveSource(cfg, backend=SoundDeviceBackend(), stop=threading.Event())
    it = src.blocks()
    next(it), next(it)
    assert src.state == "running" and src.reconnects == 0
    _next_audio(it, src)  # third read fails: lost, re-listed, reopened at once
    assert src.reconnects == 1 and src.state == "running"
    assert (sd.terminated, sd.initialized) == (1, 1)
    assert sd.streams[0].closed and len(sd.streams) == 2
