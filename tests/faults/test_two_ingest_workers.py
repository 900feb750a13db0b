"""Two ingest workers on the shared subscription, uploads delivered out of order, and the
broker stopped mid-upload: every batch is stored exactly once and deleted on the device
only on its signed ack (docs/adr/0017).

Real components: Mosquitto (mTLS, shared subscription), one swtpm (the device's identity
key signs every envelope), a SoftHSM2 token, and two ``cloud-sidecar serve`` processes on
one store and audit log. The device side is the daemon's own ``Outbox`` on the in-memory
replay buffer, publishing over its own mTLS session; the test shuffles the order the
sealed batches first go out in, stops the broker half-way (``SE_FAULT_OUTAGE_S``, 15 s
by default; the soak setting is 60), and then lets the outbox resend until every batch
is acknowledged. Before the replay window, a worker committing seq 6 before seq 5 made
the cloud refuse 5 as a replay and the device delete it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cloud_sidecar.store import Store
from devstack.mosquitto import restart_broker, stop_broker
from devstack.provision import ACK_PUBLIC_KEY_FILE, cloud_config, export_cloud_keys
from devstack.stack import DevStack
from edge_daemon.buffer import MemoryReplayStore
from edge_daemon.config import UplinkConfig
from edge_daemon.keys.tpm import TpmKeyStore
from edge_daemon.uplink import Outbox
from fleet_protocol import topics
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.mqtt import MqttLink

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_BATCHES = 40
OUTAGE_S = float(os.environ.get("SE_FAULT_OUTAGE_S", "15"))


def _wait(what: str, cond: Callable[[], bool], timeout: float, tick: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick()
        time.sleep(0.5)


def _kinds(data_dir: Path) -> list[str]:
    path = data_dir / "audit.jsonl"
    return [json.loads(x)["kind"] for x in path.open()] if path.exists() else []


def test_two_workers_out_of_order_and_a_broker_outage_store_every_batch_once(
    tmp_path: Path,
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        unwrap, _ = export_cloud_keys(stack, tmp_path / "cloud-keys")
        data_dir = tmp_path / "cloud" / "data"
        cfg = cloud_config(stack, data_dir, tmp_path / "no-base-model")
        slot = stack.devices[0]
        keys = TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys")
        store = Store(data_dir / "store.sqlite3", "eu-central-1")
        store.register_device(slot.device_id, keys.signing_public_key_pem())
        store.close()
        env = {**os.environ, **stack.token.env()}
        logs = [(tmp_path / f"serve-{i}.log").open("wb") for i in range(2)]
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "cloud_sidecar", "serve", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for log in logs
        ]
        buffer = MemoryReplayStore()
        held: list[bytes] = []
        offline = True

        def publish(topic: str, payload: bytes) -> bool:
            if offline:
                held.append(payload)
                return False
            return link.publish(topic, payload, qos=1, timeout_s=2)

        outbox = Outbox(
            device=slot.device_id,
            buffer=buffer,
            signer=keys,
            unwrap_public_key_pem=unwrap.read_bytes(),
            publish=publish,
            cfg=UplinkConfig(batch_samples=2, retry_s=3.0),
            ack_public_key_pem=(unwrap.parent / ACK_PUBLIC_KEY_FILE).read_bytes(),
        )
        link = MqttLink(
            stack.endpoint(slot.cert),
            client_id=slot.device_id,
            on_message=lambda _t, p: outbox.on_ack(p),
            subscriptions=[(topics.ack(slot.device_id), 1)],
        )
        try:
            _wait("both workers serving", lambda: _kinds(data_dir).count("sidecar.started") == 2,
                  60, lambda: None)  # fmt: skip
            link.start(wait_s=10)
            time.sleep(0.5)
            for i in range(2 * N_BATCHES):
                meta = SampleMeta(
                    sample_id=f"{i:032x}", captured_at_ms=1_700_000_000_000 + 1000 * i,
                    stream_offset_s=float(i), predicted="horn", score=0.4,
                    model_sha256="ab" * 32, reason="low_confidence",
                )  # fmt: skip
                buffer.add(meta, np.full((N_BANDS, N_FRAMES), i % 7, np.float16))
            assert outbox.seal() == N_BATCHES
            offline = False
            random.Random(9).shuffle(held)  # delivered out of order, to two workers
            for n, payload in enumerate(held):
                link.publish(topics.upload(slot.device_id), payload, qos=1, timeout_s=2)
                if n == N_BATCHES // 2:
                    stop_broker(stack.procs, stack.broker)  # mid-upload
                    time.sleep(OUTAGE_S)
                    restart_broker(stack.procs, stack.broker)
            _wait("every batch acknowledged", lambda: not buffer.unacked(), 240,
                  outbox.resend_due)  # fmt: skip
        finally:
            link.stop()
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(30)
            for log in logs:
                log.close()
            keys.close()
        db = sqlite3.connect(f"file:{data_dir / 'store.sqlite3'}?mode=ro", uri=True)
        try:
            (stored, distinct, samples) = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT batch_id), SUM(n_samples) FROM batches"
            ).fetchone()
        finally:
            db.close()
    s = outbox.stats
    print(
        f"batches sealed {N_BATCHES}, stored {stored} (lost {N_BATCHES - stored}, stored twice"
        f" {stored - distinct}), samples {samples}; acks {s.acks}, resends {s.resends},"
        f" refused {s.rejected}, unverified acks {s.acks_unverified}"
    )
    assert stored == distinct == N_BATCHES and samples == 2 * N_BATCHES
    assert s.rejected == {} and s.acks == N_BATCHES
