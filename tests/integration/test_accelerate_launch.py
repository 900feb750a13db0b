"""The adapter's training loop under ``accelerate launch`` (the README's GPU command),
here with ``--cpu``: one process trains the same adapter, bit for bit, as a plain run;
a multi-process launch (``WORLD_SIZE`` > 1) is refused with the command to use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "faults" / "train_child.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_accelerate_launch_one_process_trains_the_same_adapter_as_a_plain_run(
    tmp_path: Path,
) -> None:
    plain = _run([sys.executable, str(CHILD), str(tmp_path / "c1"), str(tmp_path / "plain.st")])
    assert plain.returncode == 0, plain.stderr[-2000:]
    launched = _run([
        str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(CHILD), str(tmp_path / "c2"), str(tmp_path / "accelerate.st"),
    ])  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-2000:]
    a, b = load_file(str(tmp_path / "plain.st")), load_file(str(tmp_path / "accelerate.st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_multi_process_launch_is_refused_with_the_command_to_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud_sidecar.adapter_fit import training_device
    from cloud_sidecar.errors import TrainingError

    assert training_device() == torch.device("cpu")  # not launched: the CPU
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="accelerate launch --num_processes 1"):
        training_device()
