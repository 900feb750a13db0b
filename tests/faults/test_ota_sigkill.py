"""SIGKILL in every update state: after a restart the device runs a valid model and says so.

A child process boots a device's slot manager (the same ``SlotManager`` the daemon's
main loop drives), installs adapter v2 over a confirmed v1, and kills itself with
SIGKILL right after the state named by ``KILL_AT`` was persisted and reported (plus
once in the middle of building the new slot). The parent then boots the device again
and checks: the model that runs loads and is the one the record names, the reported
state is consistent with it, and no unreferenced slot directory is left behind.

Model building and loading are file-backed stand-ins (tests/unit/slot_fakes.py): the
property under test is the lifecycle's crash consistency, not ONNX.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_daemon.ota_slots import HealthPolicy, SlotManager
from tests.unit.slot_fakes import build, load, shadow_check

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from edge_daemon.ota_slots import HealthPolicy, SlotManager
    from tests.unit import slot_fakes

    state, kill_at, tmp = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    armed = [False]

    def report(s, v, r):
        if armed[0] and s == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def build(adapter, out):
        if armed[0] and kill_at == "mid_build":
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.int8").write_bytes(b"mod")  # half a file
            os.kill(os.getpid(), signal.SIGKILL)
        return slot_fakes.build(adapter, out)

    policy = HealthPolicy(min_windows=5, max_latency_s=0.1)
    m = SlotManager(state, build=build, load=slot_fakes.load, shadow_check=slot_fakes.shadow_check,
                    swap=lambda c: None, report=report, policy=policy)
    m.recover()
    for version, content, healthy in ((1, b"one", True), (2, b"two", kill_at != "rolled_back")):
        armed[0] = version == 2
        adapter = tmp / f"adapter-{version}"
        adapter.write_bytes(content)
        m.begin(version, "queued")
        m.begin(version, "downloading")
        m.install(adapter, version, "ab" * 32, baseline_confident=0.5)
        for _ in range(5):
            m.observe(healthy, 0.01, 0.9)
    sys.exit(3)  # not killed: the test expects every run to die
    """
)

STATES = [
    "queued",
    "downloading",
    "verifying",
    "mid_build",
    "staged",
    "active",
    "confirmed",
    "rolled_back",
]


@pytest.mark.parametrize("kill_at", STATES)
def test_sigkill_in_each_state_leaves_a_valid_model_and_a_consistent_state(
    tmp_path: Path, kill_at: str
) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(state), kill_at, str(tmp_path)],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    reports: list[tuple[str, int, str]] = []
    running: list[str] = []
    m: SlotManager[str] = SlotManager(
        state,
        build=build,
        load=load,
        shadow_check=shadow_check,
        swap=running.append,
        report=lambda s, v, r: reports.append((s, v, r)),
        policy=HealthPolicy(min_windows=5),
    )
    model = m.recover()
    record = m.record
    expected_model = {
        "queued": "model:one",
        "downloading": "model:one",
        "verifying": "model:one",
        "mid_build": "model:one",
        "staged": "model:one",
        "active": "model:two",
        "confirmed": "model:two",
        "rolled_back": "model:one",
    }[kill_at]
    assert model == expected_model
    assert (record.active.adapter_version if record.active else 0) == int(model == "model:two") + 1
    expected_state = {
        "active": "active",  # switched, not yet confirmed: the health window starts again
        "confirmed": "confirmed",
        "rolled_back": "rolled_back",
    }.get(kill_at, "failed")
    assert reports[-1][0] == expected_state
    if expected_state == "failed":
        assert reports[-1][2] == "interrupted"
    referenced = {s.directory for s in (record.active, record.previous) if s}
    assert {p.name for p in (state / "ota" / "slots").iterdir()} == referenced
