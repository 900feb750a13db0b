"""Two ingest workers on the shared subscription, uploads delivered out of order, and the
broker stopped mid-upload: every batch is stored exactly once and deleted on the device
only on its signed ack (docs/adr/0017).

Real components: Mosquitto (mTLS, shared subscription), one swtpm (the device's identity
key signs every envelope), a SoftHSM2 token, and two ``cloud-sidecar serve`` processes on
one store and audit log. The device side is the daemon's own ``Outbox`` (uplink_rig.py);
the test shuffles the order the sealed batches first go out in, stops the broker
half-way (``SE_FAULT_OUTAGE_S``, 15 s by default; the soak setting is 60), and then lets
the outbox resend until every batch is acknowledged. Before the replay window, a worker
committing seq 6 before seq 5 made the cloud refuse 5 as a replay and the device delete it.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from devstack.mosquitto import restart_broker, stop_broker
from devstack.stack import DevStack

from .uplink_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_BATCHES = 40
OUTAGE_S = float(os.environ.get("SE_FAULT_OUTAGE_S", "15"))


def test_two_workers_out_of_order_and_a_broker_outage_store_every_batch_once(
    tmp_path: Path,
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path)
        try:
            rig.start_worker()
            rig.start_worker()
            held = list(rig.seal(N_BATCHES))
            rig.connect()
            random.Random(9).shuffle(held)  # delivered out of order, to two workers
            for n, payload in enumerate(held):
                rig.send(payload)
                if n == N_BATCHES // 2:
                    stop_broker(stack.procs, stack.broker)  # mid-upload
                    time.sleep(OUTAGE_S)
                    restart_broker(stack.procs, stack.broker)
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
        finally:
            rig.close()
    s = rig.outbox.stats
    print(
        f"batches sealed {N_BATCHES}, stored {stored} (lost {N_BATCHES - stored}, stored twice"
        f" {stored - distinct}), samples {samples}; acks {s.acks}, resends {s.resends},"
        f" refused {s.rejected}, unverified acks {s.acks_unverified}"
    )
    assert stored == distinct == N_BATCHES and samples == 2 * N_BATCHES
    assert s.rejected == {} and s.acks == N_BATCHES
