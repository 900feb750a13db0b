"""The daemon as a device runs it: ``edge-daemon run`` on a microphone that never ends.

The microphone is ALSA's ``file`` plugin fed through a FIFO at real time (the PortAudio
path a Pi's I2S microphone takes, tests/integration/alsa_mic.py); the audio is the
simulated city, rendered chunk after chunk for as long as the test runs. Real
Mosquitto (mTLS, ACL), swtpm and SoftHSM; the sidecar serves in this process.

While audio flows, the daemon must: apply a signed update with no gap in capture; keep
batches through a broker outage and resend them after the broker comes back, each
stored exactly once; apply a second update and a rollback (a roll-forward to the first
adapter). Capture counters prove no frame was lost or dropped, and the listener kept
pace with the microphone throughout.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sidecar.lora import convert_for_edge, train_adapter
from cloud_sidecar.ota_repo import OtaRepository, Publication
from devstack.city import SceneSource
from devstack.mosquitto import restart_broker, stop_broker
from devstack.provision import device_config
from devstack.scene.stream import SceneSpec
from devstack.scene.windows import build_training_set
from fleet_model import encode_edge_adapter, parse_edge_adapter

from .alsa_mic import BLOCK, DEVICE, AlsaMic, PacedWriter
from .conftest import Cloud

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class EndlessBlocks:
    """The city's audio as ALSA float32 bytes, one 100 ms block at a time, for ever.

    Looks like the list ``PacedWriter`` indexes (sequentially); a thread renders ahead.
    """

    def __init__(self) -> None:
        spec = SceneSpec(seed=11, duration_s=60, speech_rate=0.0)
        self._blocks: Iterator[np.ndarray] = SceneSource(spec, endless=True).blocks()
        self._ahead: queue.Queue[bytes] = queue.Queue(maxsize=600)
        self._got: dict[int, bytes] = {}
        threading.Thread(target=self._render, daemon=True).start()

    def _render(self) -> None:
        for b in self._blocks:
            pcm = np.round(np.clip(b, -1, 1) * 32767).astype(np.int16)
            self._ahead.put((pcm / 32768.0).astype("<f4").tobytes())

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> bytes:
        if i not in self._got:
            self._got = {i: self._ahead.get(timeout=60)}
        return self._got[i]


@pytest.fixture(scope="module")
def adapters(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """Two different adapters for the base: A (trained) and B (A's deltas halved)."""
    x, y = build_training_set(np.random.default_rng(3), 6, ("hilo",))
    out = tmp_path_factory.mktemp("adapters")
    a = convert_for_edge(
        train_adapter(base_model, x, y, replay=None, out_dir=out / "a", rank=2, epochs=1),
        base_model,
    )
    parsed = parse_edge_adapter(a)
    halved = tuple(replace(layer, b=layer.b * np.float32(0.5)) for layer in parsed.layers)
    return a, encode_edge_adapter(replace(parsed, layers=halved))


def _report(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "report.json").read_text()))
    except (OSError, ValueError):
        return {}


def _wait(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes], t: float) -> None:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}) waiting for {what}"
        if cond():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {t:.0f} s waiting for {what}")


def test_daemon_on_an_endless_microphone_updates_resends_and_rolls_back_without_a_gap(
    cloud: Cloud, base_model: Any, adapters: tuple[bytes, bytes], tmp_path: Path
) -> None:
    stack, slot = cloud.stack, cloud.stack.devices[1]
    mic = AlsaMic(tmp_path / "alsa", tmp_path / "alsa" / "mic.fifo")
    writer = PacedWriter(mic.infile, np.zeros(BLOCK, np.int16))
    writer.blocks = EndlessBlocks()  # type: ignore[assignment]
    writer.start()
    source = {"type": "live", "device": DEVICE, "block_ms": 100}
    selection = {"uplink_bytes_per_day": None, "audit_fraction": 1.0}  # keep every window
    path = device_config(
        stack, slot, base_model.dir, (cloud.unwrap_pem, cloud.ota_pem), source, None, selection
    )
    cfg = json.loads(path.read_text())
    cfg["uplink"] = {"batch_samples": 8, "retry_s": 2.0}
    cfg["capture"] = {"isolation": "process"}
    path.write_text(json.dumps(cfg))
    state = Path(cfg["state_dir"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
        env=mic.env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    hsm = cloud.app.hsm
    repo = OtaRepository(tmp_path / "repo", "stable", hsm.signing_public_key_pem())

    def publish(artifact: bytes | None, version: int, rollback_to: int = 0) -> Publication:
        if rollback_to:
            pub = repo.roll_back(
                rollback_to,
                expires_days=7,
                keyid=hsm.signing_key_id(),
                sign_digest=hsm.sign_digest,
            )
        else:
            assert artifact is not None
            pub = repo.add_adapter(
                artifact,
                base_model_sha256=base_model.sha256_fp32,
                adapter_version=version,
                cohort="all",
                expires_days=7,
                keyid=hsm.signing_key_id(),
                sign_digest=hsm.sign_digest,
            )
        assert repo.publish(pub, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r))
        return pub

    def applied(version: int) -> Callable[[], bool]:
        return lambda: _report(state).get("model", {}).get("adapter_version") == version

    def keeps_pace(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> None:
        """The listener processed the microphone's blocks while the update was applied."""
        done = after["stream"]["blocks"] - before["stream"]["blocks"]
        assert done >= 10 * wall_s - 60, (done, wall_s)  # 10 blocks/s, at most ~6 s behind

    try:
        _wait("audio flowing and a first batch acknowledged", lambda: _report(state).get(
            "uplink", {}).get("acks", 0) >= 1, proc, 120)  # fmt: skip
        # -- an update, mid-stream ------------------------------------------------------
        before, t0 = _report(state), time.monotonic()
        publish(adapters[0], 1)
        _wait("adapter v1 applied", applied(1), proc, 90)
        time.sleep(6)  # a report written after the swap
        keeps_pace(before, _report(state), time.monotonic() - t0)
        model_a = _report(state)["model"]["sha256"]
        # -- a broker outage: batches wait in the buffer, then go out again -------------
        stop_broker(stack.procs, stack.broker)
        out = _report(state)["buffer"]
        _wait(
            "a batch sealed during the outage",
            lambda: _report(state)["buffer"]["batches"] > out["batches"],
            proc,
            60,
        )
        assert _report(state)["buffer"]["batches"] > _report(state)["buffer"]["batches_acked"]
        restart_broker(stack.procs, stack.broker)

        def all_acked() -> bool:
            b = _report(state)["buffer"]
            return b["batches"] == b["batches_acked"] and b["batches"] > out["batches"]

        _wait("every batch acknowledged after the outage", all_acked, proc, 90)
        assert _report(state)["uplink"]["resends"] >= 1
        # -- a second update, then a rollback to the first ------------------------------
        publish(adapters[1], 2)
        _wait("adapter v2 applied", applied(2), proc, 90)
        assert _report(state)["model"]["sha256"] != model_a
        before, t0 = _report(state), time.monotonic()
        publish(None, 0, rollback_to=1)
        _wait("the rollback (v3 = adapter v1) applied", applied(3), proc, 90)
        time.sleep(6)
        after = _report(state)
        keeps_pace(before, after, time.monotonic() - t0)
        assert after["model"]["sha256"] == model_a  # the same bytes as v1, merged again
        # -- throughout: nothing lost, nothing stored twice, still listening -------------
        assert after["state"] == "listening"
        cap = after["capture"]
        assert (cap["frames_lost"], cap["frames_dropped"], cap["overruns"], cap["restarts"]) == (
            0,
            0,
            0,
            0,
        )
        assert writer.written - after["stream"]["blocks"] < 80  # within 8 s of the microphone
        # every batch holds 8 samples: stored samples count each acked batch once (those
        # sealed after the last report may be stored already, their acks on the way)
        stored = cloud.app.store.samples_per_device()[slot.device_id]
        assert (
            8 * after["buffer"]["batches_acked"] <= stored <= 8 * (after["buffer"]["batches"] + 2)
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            writer.stop()
