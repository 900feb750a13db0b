"""The sidecar killed with SIGKILL mid-ingest: after a restart every batch is stored
exactly once, and the audit chain still verifies (docs/adr/0017).

Real components as in test_two_ingest_workers.py. One ``serve`` process takes a stream of
uploads and is killed with SIGKILL while they arrive (a batch may be stored without its
ack having gone out, or be half-way through its transaction); a second one is started on
the same store and audit log, and the device's outbox resends whatever was not acked.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from cloud_sidecar.audit import verify
from devstack.stack import DevStack

from .uplink_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_BATCHES = 30


def test_sigkill_mid_ingest_then_restart_stores_every_batch_once(tmp_path: Path) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path)
        try:
            first = rig.start_worker()
            held = list(rig.seal(N_BATCHES))
            rig.connect()
            for n, payload in enumerate(held):
                rig.send(payload)
                if n == N_BATCHES // 3:
                    time.sleep(0.3)  # some in flight, some stored
                    first.send_signal(signal.SIGKILL)
                    first.wait(10)
            killed_at = rig.stored()[0]
            rig.start_worker()
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
        finally:
            rig.close()
        entries = verify(rig.data_dir / "audit.jsonl")
    s = rig.outbox.stats
    print(
        f"batches sealed {N_BATCHES}, stored when killed {killed_at}, stored {stored} (lost"
        f" {N_BATCHES - stored}, stored twice {stored - distinct}); acks {s.acks}, resends"
        f" {s.resends}; audit entries {entries} verify"
    )
    assert 0 < killed_at < N_BATCHES, "the kill did not land mid-ingest"
    assert stored == distinct == N_BATCHES and samples == 2 * N_BATCHES
    assert s.rejected == {} and s.acks == N_BATCHES
