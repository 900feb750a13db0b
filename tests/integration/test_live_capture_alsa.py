"""Live capture through the real PortAudio/ALSA path on a machine with no sound card.

The device is ALSA's ``file`` plugin (``tests/integration/alsa_mic.py``): PortAudio lists
it as ``filemic``, and the daemon's ``SoundDeviceBackend``, ``LiveSource`` and capture
process run on it unchanged, each in a process whose environment holds that ALSA
configuration (PortAudio reads it once, at ``import sounddevice``).

Two things this device cannot do, so they stay covered by the fake backend in
``tests/unit/test_capture_sources.py`` only: a stream that *fails* while running (the
``null`` slave never returns an error; a wedged device, which it can imitate, is tested
here) and an input overrun (``null`` has no clock, so PortAudio never flags one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from edge_daemon.capture import CaptureProcess, CaptureStats
from edge_daemon.config import CaptureConfig, LiveSourceConfig
from edge_daemon.errors import CaptureError
from tests.integration.alsa_mic import (
    BLOCK,
    DEVICE,
    RATE,
    AlsaMic,
    PacedWriter,
    as_float,
    block_positions,
    ramp,
)

pytestmark = pytest.mark.integration

N_BLOCKS = 20  # 2 s of audio in the regular infile
PAST_END = 4  # blocks read after it ends
PAUSE_AFTER = 5  # the consumer sleeps after this block

READER = r"""
import json, sys, time
import numpy as np
from edge_daemon.capture.live import LiveSource
from edge_daemon.config import LiveSourceConfig

devices, n, pause_after, out = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
runs, arrays = [], {}
for k, device in enumerate(devices):
    src = LiveSource(LiveSourceConfig(device=device))
    it = src.blocks()
    got = []
    for i in range(n):
        got.append(next(it))
        if i == pause_after:
            time.sleep(0.3)
    runs.append({"device": device, "name": src.device_name, "state": src.state,
                 "overruns": src.overruns, "reconnects": src.reconnects})
    it.close()
    arrays[f"run{k}"] = np.stack(got)
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(runs, f)
"""


@dataclass
class DirectRuns:
    """``LiveSource`` over ``filemic`` (a regular infile), opened three ways, in one process."""

    mic: AlsaMic
    samples: npt.NDArray[np.int16]
    index: int
    runs: list[dict[str, object]]
    blocks: list[npt.NDArray[np.float32]]  # per run: (N_BLOCKS + PAST_END, BLOCK)


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> DirectRuns:
    home = tmp_path_factory.mktemp("alsa-direct")
    mic = AlsaMic(home, home / "in.raw")
    samples = ramp(N_BLOCKS)
    mic.write(samples)
    index = mic.require_listed()
    out = home / "result"
    devices = [DEVICE, index, DEVICE[:5]]  # name, PortAudio index, part of the name
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            READER,
            json.dumps(devices),
            str(N_BLOCKS + PAST_END),
            str(PAUSE_AFTER),
            str(out),
        ],
        env=mic.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, f"live capture through ALSA failed:\n{r.stderr[-4000:]}"
    runs = json.loads(Path(f"{out}.json").read_text())
    with np.load(f"{out}.npz") as z:
        blocks = [z[f"run{k}"] for k in range(len(devices))]
    return DirectRuns(mic, samples, index, runs, blocks)


def test_filemic_is_found_by_name_by_index_and_by_part_of_its_name(direct: DirectRuns) -> None:
    assert [r["device"] for r in direct.runs] == [DEVICE, direct.index, DEVICE[:5]]
    assert [r["name"] for r in direct.runs] == [DEVICE] * 3
    assert all(r["state"] == "running" and r["reconnects"] == 0 for r in direct.runs)


def test_filemic_delivers_the_files_int16_samples_as_float32_exactly_and_in_order(
    direct: DirectRuns,
) -> None:
    want = as_float(direct.samples)
    for run in direct.blocks:
        assert run.shape == (N_BLOCKS + PAST_END, BLOCK), "100 ms mono blocks at 16 kHz"
        assert run.dtype == np.float32
        np.testing.assert_array_equal(run[:N_BLOCKS].reshape(-1), want)


def test_alsa_opened_filemic_at_16_khz_mono_float32(direct: DirectRuns) -> None:
    """The file plugin names its capture mirror after the parameters ALSA was opened with."""
    assert direct.mic.mirrors() == [f"mirror-{RATE}-1-FLOAT_LE.raw"]


def test_filemic_never_overruns_even_when_its_consumer_pauses(direct: DirectRuns) -> None:
    """``null`` has no clock: a paused reader loses nothing and PortAudio flags nothing.

    So a real overflow flag cannot be provoked here; counting it is tested with the fake
    backend (tests/unit/test_capture_sources.py).
    """
    assert [r["overruns"] for r in direct.runs] == [0, 0, 0]
    for run in direct.blocks:  # the blocks after the 0.3 s pause are still the next ones
        assert block_positions(list(run[PAUSE_AFTER : PAUSE_AFTER + 3]), direct.samples) == [
            BLOCK * i for i in range(PAUSE_AFTER, PAUSE_AFTER + 3)
        ]


def test_past_the_end_of_its_infile_filemic_repeats_stale_audio_without_an_error(
    direct: DirectRuns,
) -> None:
    """What ALSA does at the end of the infile: no error, no silence, old buffer contents.

    The file plugin leaves the ring buffer as it was when ``read`` returns 0, so the
    device keeps "capturing" the last buffer's worth of audio. A regular infile therefore
    cannot make the device disappear; the FIFO tests below hold the writer instead.
    """
    for run, info in zip(direct.blocks, direct.runs, strict=True):
        delivered = run[:N_BLOCKS]
        for b in run[N_BLOCKS:]:
            assert np.any(b != 0), "past the end, ALSA's file plugin does not return silence"
            assert any(np.array_equal(b, d) for d in delivered), "stale audio, not new audio"
        assert info["state"] == "running" and info["reconnects"] == 0


# -- the capture process (edge_daemon.capture.worker) over ZeroMQ ---------------------


def _inherit(mic: AlsaMic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture processes started by this test see ``mic``'s ALSA configuration."""
    monkeypatch.setenv("HOME", str(mic.home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)


@pytest.fixture
def fifo_mic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AlsaMic:
    """``filemic`` reading a FIFO (``PacedWriter``), seen by the capture processes."""
    mic = AlsaMic(tmp_path, tmp_path / "in.fifo")
    mic.write(ramp(1))  # a regular file first: a FIFO without a writer would block the probe
    mic.require_listed()
    mic.infile.unlink()
    _inherit(mic, monkeypatch)
    return mic


def _live() -> LiveSourceConfig:
    return LiveSourceConfig(device=DEVICE, retry_initial_s=0.2, retry_max_s=0.4)


def _collect(
    cap: CaptureProcess,
    until: Callable[[list[npt.NDArray[np.float32]]], bool],
    stop: threading.Event,
    timeout_s: float,
) -> tuple[list[npt.NDArray[np.float32]], CaptureStats]:
    """Blocks until ``until`` holds (or the timeout), and the stats just before closing."""
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    got: list[npt.NDArray[np.float32]] = []
    it = cast(Generator[npt.NDArray[np.float32], None, None], cap.blocks())
    try:
        for b in it:
            got.append(b)
            if until(got):
                break
        return got, cap.stats()
    finally:
        timer.cancel()
        it.close()
        cap.close()


def _reached(block: int) -> Callable[[list[npt.NDArray[np.float32]]], bool]:
    """True once the last block received is block ``block`` of the ramp."""
    return lambda got: round(float(got[-1][0]) * 32_768) + 32_768 == block * BLOCK


class _States(threading.Thread):
    """Every ``CaptureStats.state`` seen while the test runs."""

    def __init__(self, cap: CaptureProcess) -> None:
        super().__init__(daemon=True)
        self.cap, self.seen, self.done = cap, set[str](), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.seen.add(self.cap.stats().state)


def test_missing_device_is_one_capture_error_naming_it_and_listing_what_portaudio_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mic = AlsaMic(tmp_path, tmp_path / "in.raw")
    mic.write(ramp(1))
    index = mic.require_listed()
    _inherit(mic, monkeypatch)
    cap = CaptureProcess(LiveSourceConfig(device="no-such-mic"), CaptureConfig())
    with pytest.raises(CaptureError) as e:
        next(iter(cap.blocks()))
    msg = str(e.value)
    assert "input device 'no-such-mic' not found" in msg
    assert f"input devices: {index}: {DEVICE}" in msg
    assert "set source.device" in msg
    assert cap.stats().restarts == 0 and cap.stats().state == "failed"


def test_capture_process_streams_filemic_in_real_time_exactly_and_without_drops(
    fifo_mic: AlsaMic,
) -> None:
    samples = ramp(N_BLOCKS)
    writer = PacedWriter(fifo_mic.infile, samples)
    writer.start()
    stop = threading.Event()
    cap = CaptureProcess(_live(), CaptureConfig(), stop)
    try:
        t0 = time.monotonic()
        got, s = _collect(cap, lambda g: len(g) == N_BLOCKS, stop, 30)
        elapsed = time.monotonic() - t0
    finally:
        writer.stop()
    assert writer.error is None
    assert len(got) == N_BLOCKS, f"only {len(got)} of {N_BLOCKS} blocks: {s}"
    np.testing.assert_array_equal(np.concatenate(got), as_float(samples))
    assert elapsed >= (N_BLOCKS - 2) * 0.1, "the device's clock (the writer) paced capture"
    assert (s.frames, s.frames_dropped, s.frames_lost, s.overruns) == (N_BLOCKS, 0, 0, 0)
    assert (s.restarts, s.device_reconnects) == (0, 0)


def test_hung_device_is_killed_by_the_stall_watchdog_and_capture_resumes_in_order(
    fifo_mic: AlsaMic,
) -> None:
    """The writer holds back for 2.5 s: the capture process hangs inside PortAudio's read."""
    n = 24
    samples = ramp(n)
    writer = PacedWriter(fifo_mic.infile, samples, hold_at=8)
    writer.start()

    def release_later() -> None:
        writer.held.wait(30)
        time.sleep(2.5)
        writer.release()

    threading.Thread(target=release_later, daemon=True).start()
    stop = threading.Event()
    cap = CaptureProcess(_live(), CaptureConfig(stall_timeout_s=1.5, restart_initial_s=0.1), stop)
    try:
        got, s = _collect(cap, _reached(n - 1), stop, 40)
    finally:
        writer.stop()
    assert writer.error is None
    assert s.restarts >= 1, f"the hung capture process was not restarted: {s}"
    pos = block_positions(got, samples)
    assert pos == sorted(set(pos)), "blocks in order, none twice"
    assert pos[-1] == (n - 1) * BLOCK, f"capture did not resume to the end: {s}"
    assert pos == [BLOCK * i for i in range(n)], "a hang loses no audio the device delivered"
    assert s.frames_dropped == 0 and s.state == "running"


def test_device_gone_when_the_capture_process_restarts_is_retried_and_found_again(
    fifo_mic: AlsaMic,
) -> None:
    """The device hangs, then disappears (its infile is removed) while the capture process
    is restarted, then comes back: the restarted process must retry it with backoff (not
    fail as a configuration mistake) and find it again although PortAudio listed devices
    before it came back."""
    n = 24
    samples = ramp(n)
    fifo = fifo_mic.infile
    writer = PacedWriter(fifo, samples, hold_at=8)
    writer.start()
    stop = threading.Event()
    cap = CaptureProcess(_live(), CaptureConfig(stall_timeout_s=1.5, restart_initial_s=0.1), stop)
    states = _States(cap)
    states.start()

    def unplug_and_replug() -> None:
        writer.held.wait(30)
        fifo.unlink()  # gone: a process opening filemic now finds no input
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "lost" not in states.seen:
            time.sleep(0.02)
        time.sleep(0.5)  # a few retries while it is gone
        os.mkfifo(fifo)
        writer.release()

    threading.Thread(target=unplug_and_replug, daemon=True).start()
    try:
        got, s = _collect(cap, _reached(n - 1), stop, 40)
    finally:
        states.done.set()
        writer.stop()
    assert writer.error is None
    assert s.restarts >= 1, f"the hung capture process was not restarted: {s}"
    assert "lost" in states.seen, f"the device was never reported lost: {states.seen}"
    assert s.device_reconnects >= 1, f"the device's return was not counted: {s}"
    pos = block_positions(got, samples)
    assert pos == sorted(set(pos)) and pos[-1] == (n - 1) * BLOCK, f"{pos}; {s}"
    assert s.state == "running" and s.frames_dropped == 0
