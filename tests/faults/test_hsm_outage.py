"""The HSM goes away while the sidecar serves: no ack, nothing stored; after it returns,
the device's resend of the same envelope is stored exactly once.

Real components: Mosquitto (mTLS), one swtpm device identity, a SoftHSM2 token, and
``cloud-sidecar serve`` as its own process. The outage is made by moving the token's
directory away (what a detached network HSM or a lost volume looks like to SoftHSM:
the key handle becomes invalid and the token cannot be opened again), then moving it
back. The device side is played by the test: it seals with its TPM key and resends
the same bytes every second until it gets an ack, as the edge uplink does.

At the end the audit log is verified against the real HSM signing key: checkpoints
signed at start, by ``cloud-sidecar audit checkpoint`` from a second process while
serve runs, and at stop, plus the separate checkpoint file.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cloud_sidecar.audit import verify_log
from cloud_sidecar.store import Store
from devstack.provision import cloud_config, export_cloud_keys
from devstack.stack import DeviceSlot, DevStack
from edge_daemon.keys.tpm import TpmKeyStore
from fleet_protocol import batch, envelope, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.messages import Ack

pytestmark = pytest.mark.integration


@dataclass
class Outage:
    stack: DevStack
    config: Path
    data_dir: Path
    signing_pem: Path
    unwrap_pem: Path
    serve: subprocess.Popen[bytes]


def _wait(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _metric(data_dir: Path, name: str) -> int:
    path = data_dir / "metrics.prom"
    text = path.read_text() if path.exists() else ""
    m = re.search(rf"^{name} (\d+)$", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def _batches(data_dir: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(f"file:{data_dir / 'store.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT batch_id, n_samples FROM batches ORDER BY seq").fetchall()
    finally:
        db.close()


def _audit_kinds(data_dir: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (data_dir / "audit.jsonl").open()]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    work = tmp_path_factory.mktemp("hsm-outage")
    saved = os.environ.get("SOFTHSM2_CONF")
    with DevStack(work, n_devices=1) as stack:
        unwrap, signing = export_cloud_keys(stack, work / "cloud-keys")
        data_dir = work / "cloud" / "data"
        cfg = cloud_config(stack, data_dir, work / "no-base-model")
        slot = stack.devices[0]
        with TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys") as keys:
            store = Store(data_dir / "store.sqlite3", "eu-central-1")
            store.register_device(slot.device_id, keys.signing_public_key_pem())
            store.close()
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "cloud_sidecar", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **stack.token.env()},
        )
        try:
            _wait(
                "the sidecar to start",
                lambda: (
                    (data_dir / "audit.jsonl").exists()
                    and "audit.checkpoint" in _audit_kinds(data_dir)
                    and (data_dir / "metrics.prom").exists()
                ),
                60,
            )
            yield Outage(stack, cfg, data_dir, signing, unwrap, serve)
        finally:
            if serve.poll() is None:
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(30)
                except subprocess.TimeoutExpired:
                    serve.kill()
                    serve.wait(10)
            log.close()
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


class Device:
    def __init__(self, outage: Outage, slot: DeviceSlot, keys: TpmKeyStore) -> None:
        self.outage, self.slot, self.keys = outage, slot, keys
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.seq = 0
        stack = outage.stack
        self.link = MqttLink(
            stack.endpoint(slot.cert),
            client_id=slot.device_id,
            on_message=lambda _t, p: self.acks.put(Ack.from_bytes(p)),
            subscriptions=[(topics.ack(slot.device_id), 1)],
        )

    def seal(self, n: int) -> tuple[str, bytes]:
        metas = tuple(
            batch.SampleMeta(
                sample_id=os.urandom(16).hex(),
                captured_at_ms=1,
                stream_offset_s=float(i),
                predicted="horn",
                score=0.4,
                model_sha256="ab" * 32,
                reason="low_confidence",
            )
            for i in range(n)
        )
        plain = batch.encode(
            batch.Batch(self.slot.device_id, metas, np.zeros((n, N_BANDS, N_FRAMES), np.float16))
        )
        pem = self.outage.unwrap_pem.read_bytes()
        self.seq += 1
        batch_id = os.urandom(16).hex()
        return batch_id, envelope.seal(
            plain,
            device=self.slot.device_id,
            batch_id=batch_id,
            seq=self.seq,
            created_at_ms=int(time.time() * 1000),
            wrap_public_key_pem=pem,
            kid_wrap=key_id_from_pem(pem),
            kid_sig=self.keys.signing_key_id(),
            sign_digest=self.keys.sign_digest,
        )

    def send(self, payload: bytes) -> None:
        assert self.link.publish(topics.upload(self.slot.device_id), payload)

    def ack(self, timeout: float) -> Ack | None:
        try:
            return self.acks.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture
def device(outage: Outage) -> Iterator[Device]:
    slot = outage.stack.devices[0]
    with TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys") as keys:
        d = Device(outage, slot, keys)
        d.link.start(wait_s=10)
        time.sleep(0.3)  # let the ack subscription settle
        try:
            yield d
        finally:
            d.link.stop()


def test_upload_during_hsm_outage_is_not_acked_and_its_resend_is_stored_once(
    outage: Outage, device: Device
) -> None:
    data = outage.data_dir
    first_id, first = device.seal(2)
    device.send(first)
    ack = device.ack(20)
    assert ack is not None and (ack.batch_id, ack.status) == (first_id, "stored")
    stored_before = _batches(data)

    tokens = outage.stack.workdir / "hsm" / "tokens"
    away = tokens.with_name("tokens.away")
    os.rename(tokens, away)
    try:
        batch_id, payload = device.seal(3)
        device.send(payload)
        _wait(
            "the outage to be counted",
            lambda: _metric(data, "ingest_hsm_unavailable_total") >= 1,
            20,
        )
        assert device.ack(2.0) is None, "an upload was acknowledged while the HSM was away"
        for _ in range(2):  # the device resends; still no ack, still nothing stored
            device.send(payload)
            assert device.ack(1.5) is None
        assert _batches(data) == stored_before
        assert "ingest.rejected" not in _audit_kinds(data)
    finally:
        os.rename(away, tokens)

    ack = None
    deadline = time.monotonic() + 60
    while ack is None and time.monotonic() < deadline:
        device.send(payload)  # the same envelope, byte for byte
        ack = device.ack(1.5)
    assert ack is not None, "no ack after the HSM came back"
    assert (ack.batch_id, ack.status, ack.reason) == (batch_id, "stored", "")
    while (late := device.ack(1.0)) is not None:  # resends still in flight: duplicates
        assert (late.batch_id, late.status, late.reason) == (batch_id, "stored", "duplicate")
    device.send(payload)
    again = device.ack(10)
    assert again is not None and (again.status, again.reason) == ("stored", "duplicate")
    assert _batches(data) == [*stored_before, (batch_id, 3)]
    assert _metric(data, "ingest_hsm_unavailable_total") >= 3
    _wait("the reopen to be counted", lambda: _metric(data, "hsm_reopened_total") >= 1, 10)


def test_audit_checkpoints_signed_by_the_real_hsm_verify_with_its_public_key(
    outage: Outage,
) -> None:
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloud_sidecar", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **outage.stack.token.env()},
        )

    made = cli("audit", "checkpoint", "--config", str(outage.config))  # while serve runs
    assert made.returncode == 0, made.stderr
    outage.serve.send_signal(signal.SIGTERM)
    assert outage.serve.wait(30) == 0
    log, checkpoints = outage.data_dir / "audit.jsonl", outage.data_dir / "audit.checkpoints.jsonl"
    report = verify_log(log, outage.signing_pem.read_bytes(), checkpoints)
    assert report.signatures_checked and report.checkpoints == report.external_checkpoints >= 3
    assert report.last_checkpoint_seq == report.entries - 1  # the final one, at stop

    checked = cli("audit", "verify", str(log), "--public-key", str(outage.signing_pem))
    assert checked.returncode == 0 and "signatures verified" in checked.stdout
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]))  # drop the last checkpoint
    truncated = cli(
        "audit", "verify", str(log), "--public-key", str(outage.signing_pem),
        "--checkpoints", str(checkpoints),
    )  # fmt: skip
    assert truncated.returncode == 4 and "truncated" in truncated.stderr
