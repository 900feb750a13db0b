"""Shared by the daemon fault tests: the sidecar serving in this process, and
``edge-daemon run`` as its own process with a claim and a street replayed at real time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud_sidecar.app import SidecarApp
from cloud_sidecar.config import load_config
from devstack.city import write_stream
from devstack.provision import cloud_config, device_config, export_cloud_keys
from devstack.scene.stream import SceneSpec
from devstack.stack import DeviceSlot, DevStack


@contextmanager
def serving_sidecar(stack: DevStack, work: Path, base_model: Any) -> Iterator[SidecarApp]:
    app = SidecarApp(load_config(cloud_config(stack, work / "cloud", base_model.dir)))
    stop, started = threading.Event(), threading.Event()
    server = threading.Thread(target=app.run, args=(stop, started), daemon=True)
    server.start()
    assert started.wait(30) and app.fleet is not None
    try:
        yield app
    finally:
        stop.set()
        server.join(15)


def daemon_config(
    stack: DevStack,
    app: SidecarApp,
    slot: DeviceSlot,
    work: Path,
    base_model: Any,
    duration_s: int,
    seed: int,
) -> Path:
    """A config enrolling ``slot`` with a fresh claim, replaying a new street at real time."""
    assert app.fleet is not None
    keys = export_cloud_keys(stack, work / "cloud-keys")
    claim = work / f"claim-{seed}.txt"
    claim.write_text(str(app.fleet.create_claim(slot.device_id)))
    start_ms = int(time.time() * 1000)
    wav = work / f"street-{seed}.wav"
    write_stream(SceneSpec(seed=seed, duration_s=duration_s, speech_rate=0.0), wav, start_ms)
    source = {"type": "file", "path": str(wav), "start_time_ms": start_ms, "realtime": True}
    selection = {"uplink_bytes_per_day": None, "audit_fraction": 1.0}  # keep every window
    path = device_config(stack, slot, base_model.dir, keys, source, claim, selection)
    cfg = json.loads(path.read_text())
    cfg["uplink"] = {"batch_samples": 4, "retry_s": 2.0}
    path.write_text(json.dumps(cfg))
    return path


def start_daemon(path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def report(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "report.json").read_text()))
    except (OSError, ValueError):
        return {}


def buffer_counts(state: Path) -> dict[str, int]:
    return dict(report(state).get("buffer", {}))


def wait(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes], t: float) -> None:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}) waiting for {what}"
        if cond():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {t:.0f} s waiting for {what}")
