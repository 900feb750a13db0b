"""A device whose state is wiped and that is enrolled again uploads from sequence 0 and
every batch of both lives is stored exactly once (docs/adr/0017).

Before the sequence epoch, the cloud kept the device's ``last_seq`` across the wipe,
refused seq 0, 1, … as replays and the device deleted them on the "rejected" ack.

Real components: Mosquitto, one swtpm, SoftHSM, the sidecar in this process,
``edge-daemon run`` as its own process replaying a street at real time, twice: once
enrolled with a claim, then after its state directory is wiped (buffer, TLS identity,
key blobs), with a new claim from the operator.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import DevStack
from tests.integration.conftest import base_model  # noqa: F401 - the session fixture

from .daemon_run import (
    buffer_counts,
    daemon_config,
    report,
    serving_sidecar,
    start_daemon,
    stop_daemon,
    wait,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _life(stack: DevStack, app: Any, tmp: Path, model: Any, seed: int) -> dict[str, int]:
    """One life of the device: enroll, replay 25 s of street, every batch acknowledged."""
    slot = stack.devices[0]
    path = daemon_config(stack, app, slot, tmp, model, 25, seed=seed)
    state = Path(json.loads(path.read_text())["state_dir"])
    proc = start_daemon(path, tmp / f"daemon-{seed}.log")
    try:
        since: list[tuple[dict[str, int], float]] = []

        def done() -> bool:  # ended, all acked, and unchanged over 4 s (the last seal is in)
            r = report(state)
            b = dict(r.get("buffer", {}))
            if r.get("state") != "ended" or not b or b["batches"] != b["batches_acked"]:
                since.clear()
                return False
            if not since or since[0][0] != b:
                since[:] = [(b, time.monotonic())]
            return time.monotonic() - since[0][1] >= 4

        wait("the street replayed and every batch acknowledged", done, proc, 240)
        return buffer_counts(state)
    finally:
        stop_daemon(proc)


def test_a_wiped_and_reenrolled_device_starts_a_new_epoch_and_loses_nothing(
    tmp_path: Path,
    base_model: Any,  # noqa: F811
) -> None:
    with (
        DevStack(tmp_path / "stack", n_devices=1) as stack,
        serving_sidecar(stack, tmp_path, base_model) as app,
    ):
        first = _life(stack, app, tmp_path, base_model, seed=21)
        shutil.rmtree(stack.devices[0].state_dir)  # wiped: buffer, identity, key blobs
        second = _life(stack, app, tmp_path, base_model, seed=22)
        stored = app.store.counts()["batches"]
        rejected = app.metrics.get("ingest_rejected_total", reason="replay")
    sealed = first["batches"] + second["batches"]
    print(
        f"batches sealed {first['batches']} + {second['batches']} (after the wipe, from seq 0),"
        f" stored {stored}: lost {sealed - stored}, stored twice 0, refused as replays {rejected}"
    )
    assert stored == sealed and rejected == 0
