"""The capture process under faults: a slow or frozen consumer, a killed capture process.

Real processes and real ZeroMQ; the source is a WAV file paced in real time, which the
capture process treats exactly like a sound card (it never waits for the consumer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_daemon.capture import CaptureProcess
from edge_daemon.config import CaptureConfig, FileSourceConfig, LiveSourceConfig
from edge_daemon.errors import CaptureError

RATE = 16_000
FRAME = 1600  # the capture process sends 100 ms frames


def _ramp_file(tmp_path: Path, seconds: int) -> Path:
    """Sample k holds k / 2**24: every frame is identifiable by its content."""
    x = (np.arange(seconds * RATE) / 2**24).astype(np.float32)
    p = tmp_path / "ramp.wav"
    sf.write(p, x, RATE, subtype="FLOAT")
    return p


def _block_index(b: np.ndarray) -> int:
    return round(float(b[0]) * 2**24) // FRAME


def _proc(path: Path, **kw: float) -> CaptureProcess:
    cfg = CaptureConfig(isolation="process", max_lag_frames=4, restart_initial_s=0.1, **kw)
    return CaptureProcess(FileSourceConfig(path=path, realtime=True), cfg)


def test_slow_consumer_makes_drops_that_are_counted_while_capture_keeps_running(
    tmp_path: Path,
) -> None:
    cap = _proc(_ramp_file(tmp_path, 8))
    seen: list[int] = []
    pid = 0
    for b in cap.blocks():
        seen.append(_block_index(b))
        if len(seen) == 5:
            pid = cap.stats().pid
            time.sleep(5.0)  # a model 50x too slow for one frame
    s = cap.stats()
    assert s.state == "ended" and s.restarts == 0
    assert s.frames_dropped > 0, "a lagging consumer must cause counted drops"
    assert s.frames_lost == s.frames_dropped == 80 - len(seen)
    assert seen == sorted(seen) and seen[-1] == 79, "capture ran on to the end of the source"
    assert pid > 0


CONSUMER = r"""
import json, os, sys
from pathlib import Path
from edge_daemon.capture import CaptureProcess
from edge_daemon.config import CaptureConfig, FileSourceConfig
cap = CaptureProcess(
    FileSourceConfig(path=Path(sys.argv[1]), realtime=True),
    CaptureConfig(isolation="process", max_lag_frames=4, restart_initial_s=0.1),
)
out = Path(sys.argv[2])
n = 0
for b in cap.blocks():
    n += 1
    s = cap.stats()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"n": n, "first": float(b[0]), **s.__dict__}))
    os.replace(tmp, out)
s = cap.stats()
out.write_text(json.dumps({"n": n, "done": True, **s.__dict__}))
"""


def _wait_for(path: Path, pred: object, timeout: float = 20.0) -> dict[str, object]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            d: dict[str, object] = json.loads(path.read_text())
            if pred(d):  # type: ignore[operator]
                return d
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out; last state {path.read_text() if path.exists() else None}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stopped_consumer_with_kill_stop_makes_counted_drops_and_capture_keeps_running(
    tmp_path: Path,
) -> None:
    out = tmp_path / "state.json"
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, str(_ramp_file(tmp_path, 8)), str(out)]
    )
    try:
        d = _wait_for(out, lambda d: d["n"] >= 5)
        worker = int(d["pid"])  # type: ignore[call-overload]
        os.kill(consumer.pid, signal.SIGSTOP)
        time.sleep(5.0)
        assert _alive(worker), "the capture process must keep running while the consumer is frozen"
        os.kill(consumer.pid, signal.SIGCONT)
        d = _wait_for(out, lambda d: d.get("done") is True)
        assert d["state"] == "ended" and d["restarts"] == 0
        assert int(d["frames_dropped"]) > 0  # type: ignore[call-overload]
        assert d["frames_lost"] == d["frames_dropped"]
        assert int(d["n"]) + int(d["frames_lost"]) == 80  # type: ignore[call-overload]
        assert consumer.wait(timeout=10) == 0
    finally:
        if consumer.poll() is None:
            os.kill(consumer.pid, signal.SIGCONT)
            consumer.kill()
            consumer.wait()


def test_killed_capture_process_is_noticed_and_restarted_where_it_stopped(tmp_path: Path) -> None:
    cap = _proc(_ramp_file(tmp_path, 4))
    seen: list[int] = []
    first_pid = 0
    for b in cap.blocks():
        seen.append(_block_index(b))
        if len(seen) == 10:
            first_pid = cap.stats().pid
            os.kill(first_pid, signal.SIGKILL)
    s = cap.stats()
    assert s.restarts == 1 and s.state == "ended"
    assert seen == sorted(set(seen)), "no block replayed after the restart"
    assert seen[-1] == 39
    assert len(seen) + s.frames_lost == 40, "every frame is either delivered or counted lost"
    assert not _alive(first_pid)


def test_capture_process_that_never_speaks_is_killed_and_restarted(tmp_path: Path) -> None:
    cap = _proc(_ramp_file(tmp_path, 3), stall_timeout_s=1.0)
    n = 0
    for _ in cap.blocks():
        n += 1
        if n == 5:
            os.kill(cap.stats().pid, signal.SIGSTOP)  # hung, not dead
    s = cap.stats()
    assert s.restarts == 1 and s.state == "ended" and n + s.frames_lost == 30


def test_missing_live_device_in_the_capture_process_is_one_clear_error_not_a_restart_loop() -> None:
    cap = CaptureProcess(LiveSourceConfig(device="no-such-usb-mic"), CaptureConfig())
    with pytest.raises(CaptureError, match=r"'no-such-usb-mic' not found.*set source\.device"):
        next(iter(cap.blocks()))
    assert cap.stats().restarts == 0 and cap.stats().state == "failed"


def test_capture_process_does_not_outlive_a_daemon_killed_with_sigkill(tmp_path: Path) -> None:
    wav = _ramp_file(tmp_path, 600)  # ten minutes in real time: it would run on for that long
    source = json.dumps({"type": "file", "path": str(wav), "realtime": True})
    # a stand-in daemon that starts the capture process, prints its pid, then waits
    parent = subprocess.Popen(
        [
            "bash",
            "-c",
            f"{sys.executable} -m edge_daemon.capture.worker --endpoint "
            f"ipc://{tmp_path}/frames.sock --source '{source}' --parent-pid $$ & echo $!; wait",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    time.sleep(3)  # on a loaded CPU possibly still importing: the pid covers that race
    assert _alive(worker)
    parent.kill()  # SIGKILL: no chance to stop its child
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the capture process outlived its daemon"


def test_capture_process_stops_when_its_daemon_died_before_it_finished_starting(
    tmp_path: Path,
) -> None:
    # The daemon is gone before the worker arms PR_SET_PDEATHSIG (killed while the worker
    # still imports): no signal will ever come, and the worker's parent is already init.
    # Seen in a test run: such an orphan captured for ever and filled the disk.
    wav = _ramp_file(tmp_path, 600)
    source = json.dumps({"type": "file", "path": str(wav), "realtime": True})
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is certainly not this worker's parent any more
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_daemon.capture.worker",
            "--endpoint",
            f"ipc://{tmp_path}/frames.sock",
            "--source",
            source,
            "--parent-pid",
            str(dead.pid),
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        _, err = worker.communicate(timeout=180)  # start-up on a loaded CPU
    finally:
        worker.kill()
    assert worker.returncode == 0
    assert f"the daemon (pid {dead.pid}) is gone: capture stops" in err
