"""Shared by the ingest fault tests: ``cloud-sidecar serve`` processes on one store, and a
device played by the daemon's own ``Outbox`` (TPM-signed envelopes, signed acks) on the
in-memory replay buffer, over its own mTLS session."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from cloud_sidecar.store import Store
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


def wait_for(
    what: str, cond: Callable[[], bool], timeout: float, tick: Callable[[], object]
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick()
        time.sleep(0.5)


class Rig:
    """The cloud side (``serve`` processes) and one device with an outbox."""

    def __init__(self, stack: DevStack, work: Path) -> None:
        self.stack, self.work = stack, work
        self.unwrap, _ = export_cloud_keys(stack, work / "cloud-keys")
        self.data_dir = work / "cloud" / "data"
        self.cfg = cloud_config(stack, self.data_dir, work / "no-base-model")
        self.slot = stack.devices[0]
        self.keys = TpmKeyStore(self.slot.tpm.tcti, self.slot.state_dir / "keys")
        store = Store(self.data_dir / "store.sqlite3", "eu-central-1")
        store.register_device(self.slot.device_id, self.keys.signing_public_key_pem())
        store.close()
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.buffer = MemoryReplayStore()
        self.held: list[bytes] = []
        self.offline = True
        self.outbox = Outbox(
            device=self.slot.device_id,
            buffer=self.buffer,
            signer=self.keys,
            unwrap_public_key_pem=self.unwrap.read_bytes(),
            publish=self._publish,
            cfg=UplinkConfig(batch_samples=2, retry_s=3.0),
            ack_public_key_pem=(self.unwrap.parent / ACK_PUBLIC_KEY_FILE).read_bytes(),
        )
        self.link = MqttLink(
            stack.endpoint(self.slot.cert),
            client_id=self.slot.device_id,
            on_message=lambda _t, p: self.outbox.on_ack(p),
            subscriptions=[(topics.ack(self.slot.device_id), 1)],
        )

    def _publish(self, topic: str, payload: bytes) -> bool:
        if self.offline:  # sealed while offline: the test decides when and in what order
            self.held.append(payload)
            return False
        return self.link.publish(topic, payload, qos=1, timeout_s=2)

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = (self.work / f"serve-{n}.log").open("wb")
        self._logs.append(log)
        started = self.kinds().count("sidecar.started")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_sidecar", "serve", "--config", str(self.cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.stack.token.env()},
        )
        self.workers.append(proc)
        wait_for("a worker serving", lambda: self.kinds().count("sidecar.started") > started,
                 60, lambda: None)  # fmt: skip
        return proc

    def kinds(self) -> list[str]:
        path = self.data_dir / "audit.jsonl"
        return [json.loads(x)["kind"] for x in path.open()] if path.exists() else []

    def seal(self, n_batches: int) -> list[bytes]:
        """Seal ``n_batches`` batches of 2 samples, held back; return their envelopes."""
        for i in range(2 * n_batches):
            meta = SampleMeta(
                sample_id=f"{i:032x}", captured_at_ms=1_700_000_000_000 + 1000 * i,
                stream_offset_s=float(i), predicted="horn", score=0.4,
                model_sha256="ab" * 32, reason="low_confidence",
            )  # fmt: skip
            self.buffer.add(meta, np.full((N_BANDS, N_FRAMES), i % 7, np.float16))
        assert self.outbox.seal() == n_batches
        return self.held

    def connect(self) -> None:
        self.link.start(wait_s=10)
        time.sleep(0.5)
        self.offline = False

    def send(self, payload: bytes) -> None:
        self.link.publish(topics.upload(self.slot.device_id), payload, qos=1, timeout_s=2)

    def until_all_acked(self, timeout: float = 240) -> None:
        wait_for("every batch acknowledged", lambda: not self.buffer.unacked(), timeout,
                 self.outbox.resend_due)  # fmt: skip

    def stored(self) -> tuple[int, int, int]:
        """(batches, distinct batch ids, samples) in the store."""
        db = sqlite3.connect(f"file:{self.data_dir / 'store.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT batch_id), COALESCE(SUM(n_samples), 0)"
                " FROM batches"
            ).fetchone()
        finally:
            db.close()
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        self.link.stop()
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            w.wait(30)
        for log in self._logs:
            log.close()
        self.keys.close()
