"""A training run killed with SIGKILL resumes from its last checkpoint and ends with the
same adapter, bit for bit, as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

CHILD = Path(__file__).with_name("train_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(ckpt: Path, out: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    err = open(log, "wb") if log is not None else None  # noqa: SIM115 - closed with the child
    return subprocess.Popen([sys.executable, str(CHILD), str(ckpt), str(out)], env=env, stderr=err)


def test_a_killed_run_resumes_and_ends_with_the_same_adapter(tmp_path: Path) -> None:
    whole = _start(tmp_path / "a", tmp_path / "a.safetensors")
    assert whole.wait(300) == 0

    killed = _start(tmp_path / "b", tmp_path / "b.safetensors")
    ckpt = tmp_path / "b" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.01)
    assert killed.poll() is None, "the run ended before a checkpoint could be interrupted"
    time.sleep(0.3)  # somewhere between checkpoints
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    assert not (tmp_path / "b.safetensors").exists()

    resumed = _start(tmp_path / "b", tmp_path / "b.safetensors", tmp_path / "resumed.log")
    assert resumed.wait(300) == 0
    assert "resuming from the checkpoint at step" in (tmp_path / "resumed.log").read_text()
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].equal(b[k]), k
