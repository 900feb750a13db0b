"""``edge-daemon run`` with ``ota.tuf_root``: TUF over MQTT chunks, two slots, while it listens.

The sidecar serving in this process holds an HSM-signed TUF repository and answers chunk
requests; the daemon (its own process, real TPM, broker, mTLS) is given only the pinned
``1.root.json``. A trained adapter is published; the daemon must verify it, stage it in
a slot, switch to it while the listener keeps running, confirm it after its health
window, and report each state on ``fleet/v1/<device>/ota/status``. Then the daemon is
killed with SIGKILL as soon as it reports each state of an update in turn (downloading,
verifying, staged, active, confirmed; queued and failed are covered by
tests/faults/test_ota_sigkill.py): after each restart it runs a model that loads, first
reports the state its record holds, and completes the update.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sidecar import ota_publish
from cloud_sidecar.lora import convert_for_edge, train_adapter
from cloud_sidecar.ota_repo import OtaRepository
from devstack.provision import device_config, tuf_root
from devstack.scene.windows import build_training_set
from fleet_model import ADAPTER_FORMAT
from fleet_model.golden import encode_golden, parse_golden
from fleet_protocol.labels import CLASSES

from .conftest import Cloud

pytest.importorskip("tuf")

from cloud_sidecar.tuf_repo import AdapterCustom

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _noise_wav(path: Path, seconds: int) -> None:
    rng = np.random.default_rng(5)
    pcm = (rng.normal(0, 0.05, 16000 * seconds) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _report(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "report.json").read_text()))
    except (OSError, ValueError):
        return {}


def _audit_states(cloud: Cloud, device: str, version: int | None = None) -> list[str]:
    """The OTA states ``device`` reported, in order (for one adapter version if given)."""
    path = cloud.app.cfg.data_dir / "audit.jsonl"
    out = []
    for line in path.read_bytes().splitlines():
        e = json.loads(line)
        ours = e["kind"] == "ota.device_status" and e["subject"] == device
        if ours and (version is None or e["details"]["adapter_version"] == version):
            out.append(e["details"]["state"])
    return out


def _golden(base_model: Any, adapter: bytes, tmp_path: Path) -> tuple[Any, Any, int]:
    """The training run's golden clips and its bound: the int8 candidate's accuracy - 10 %."""
    from cloud_sidecar.gate import score
    from cloud_sidecar.release import GOLDEN_TOLERANCE
    from cloud_sidecar.train import golden_clips, merge_for_gate

    with np.load(base_model.golden) as z:
        gx, gy = parse_golden(encode_golden(*golden_clips(z["x"], z["y"])))
    candidate = tmp_path / "candidate.int8.onnx"
    candidate.write_bytes(merge_for_gate(base_model, adapter)[0])
    accuracy = score(candidate, gx, gy)["accuracy"]
    return gx, gy, max(0, int((accuracy - GOLDEN_TOLERANCE) * 100))


def _audit_reasons(cloud: Cloud, device: str, version: int) -> list[str]:
    """``state:reason`` of each status ``device`` reported for ``version``, in order."""
    out = []
    for line in (cloud.app.cfg.data_dir / "audit.jsonl").read_bytes().splitlines():
        e = json.loads(line)
        ours = e["kind"] == "ota.device_status" and e["subject"] == device
        if ours and e["details"]["adapter_version"] == version:
            out.append(f"{e['details']['state']}:{e['details'].get('reason', '')}")
    return out


def test_the_daemon_updates_through_tuf_chunks_and_slots_while_it_listens(
    cloud: Cloud, base_model: Any, tmp_path: Path
) -> None:
    x, y = build_training_set(np.random.default_rng(3), 6, ("hilo",))
    peft = train_adapter(base_model, x, y, replay=None, out_dir=tmp_path / "peft", rank=2, epochs=1)
    adapter = convert_for_edge(peft, base_model)
    gx, gy, min_percent = _golden(base_model, adapter, tmp_path)
    cfg = cloud.app.cfg
    repo = ota_publish.open_repository(cfg, cloud.app.hsm)
    slot = cloud.stack.devices[1]
    wav = tmp_path / "street.wav"
    _noise_wav(wav, 240)
    source = {"type": "file", "path": str(wav), "realtime": True}
    root = tuf_root(cloud.config, tmp_path / "image")  # what devstack puts in the image
    assert root is not None
    assert root.read_bytes() == (repo.metadata_dir / "1.root.json").read_bytes()
    keys = (cloud.unwrap_pem, cloud.ota_pem)
    path = device_config(cloud.stack, slot, base_model.dir, keys, source, tuf_root=root)
    dev_cfg = json.loads(path.read_text())
    dev_cfg["ota"] |= {"poll_s": 2.0, "health_windows": 10}
    path.write_text(json.dumps(dev_cfg))
    state = Path(dev_cfg["state_dir"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _report(state).get("state") != "listening":
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.5)
        before = _report(state)["stream"]["blocks"]
        golden = AdapterCustom(  # the golden clips the shadow session must classify
            base_model.sha256_fp32, ADAPTER_FORMAT, 1, "all", 100, "golden-v1.bin", min_percent
        )
        repo.add_target("adapter-v1.bin", adapter, golden, encode_golden(gx, gy))
        assert repo.publish_metadata(
            cfg.ota.channel, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r)
        )
        # the single-key document of the legacy path, signed by the same HSM key with a
        # higher adapter version: a TUF device must not take it
        legacy = OtaRepository(
            tmp_path / "legacy", cfg.ota.channel, cloud.app.hsm.signing_public_key_pem()
        )
        pub = legacy.add_adapter(
            adapter,
            base_model_sha256=base_model.sha256_fp32,
            adapter_version=7,
            cohort="all",
            expires_days=7,
            keyid=cloud.app.hsm.signing_key_id(),
            sign_digest=cloud.app.hsm.sign_digest,
        )
        assert legacy.publish(pub, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            if "confirmed" in _audit_states(cloud, slot.device_id, 1):
                break
            time.sleep(0.5)
        report = _report(state)
        assert report["model"]["adapter_version"] == 1, (tmp_path / "daemon.log").read_text()[
            -3000:
        ]
        assert report["state"] == "listening" and report["stream"]["blocks"] > before
        states = _audit_states(cloud, slot.device_id, 1)
        assert states[-6:] == [
            "queued",
            "downloading",
            "verifying",
            "staged",
            "active",
            "confirmed",
        ]
        slots = json.loads((state / "ota" / "slots.json").read_text())
        assert slots["state"] == "confirmed" and slots["active"]["adapter_version"] == 1
        # v2 ships golden clips whose labels are all wrong: refused in the shadow session
        wrong = AdapterCustom(
            base_model.sha256_fp32, ADAPTER_FORMAT, 2, "all", 100, "golden-v2.bin", 90
        )
        repo.add_target(
            "adapter-v2.bin", adapter, wrong, encode_golden(gx, (gy + 1) % len(CLASSES))
        )
        assert repo.publish_metadata(
            cfg.ota.channel, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
            r.startswith("failed") for r in _audit_reasons(cloud, slot.device_id, 2)
        ):
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.5)
        assert "failed:golden_accuracy" in _audit_reasons(cloud, slot.device_id, 2)
        assert _report(state)["model"]["adapter_version"] == 1  # still the confirmed v1
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


KILL_STATES = ("downloading", "verifying", "staged", "active", "confirmed")


def _start(path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )


def _wait(what: str, cond: Any, proc: subprocess.Popen[bytes], log: Path, t: float) -> None:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited waiting for {what}: {log.read_text()[-2000:]}"
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}: {log.read_text()[-2000:]}")


def test_sigkill_of_the_daemon_in_each_update_state_leaves_a_valid_model_and_a_consistent_state(
    cloud: Cloud, base_model: Any, tmp_path: Path
) -> None:
    x, y = build_training_set(np.random.default_rng(4), 6, ("hilo",))
    peft = train_adapter(base_model, x, y, replay=None, out_dir=tmp_path / "peft", rank=2, epochs=1)
    adapter = convert_for_edge(peft, base_model)
    cfg = cloud.app.cfg
    repo = ota_publish.open_repository(cfg, cloud.app.hsm)
    version = repo.next_adapter_version()
    name = f"kill-test-v{version}.bin"
    slot = cloud.stack.devices[0]
    root = tuf_root(cloud.config, tmp_path / "image")
    assert root is not None
    wav = tmp_path / "street.wav"
    _noise_wav(wav, 600)
    source = {"type": "file", "path": str(wav), "realtime": True}
    keys = (cloud.unwrap_pem, cloud.ota_pem)
    path = device_config(cloud.stack, slot, base_model.dir, keys, source, tuf_root=root)
    dev_cfg = json.loads(path.read_text())
    dev_cfg["ota"] |= {"poll_s": 2.0, "health_windows": 8}
    path.write_text(json.dumps(dev_cfg))
    state = Path(dev_cfg["state_dir"])
    log = tmp_path / "daemon.log"
    repo.add_target(name, adapter, AdapterCustom(base_model.sha256_fp32, ADAPTER_FORMAT, version))
    for kill_at in KILL_STATES:
        shutil.rmtree(state / "ota", ignore_errors=True)  # a fresh device image, same identity
        seen = len(_audit_states(cloud, slot.device_id, version))
        proc = _start(path, log)
        try:
            _wait(
                f"state {kill_at}",
                lambda k=kill_at, n=seen: k in _audit_states(cloud, slot.device_id, version)[n:],
                proc,
                log,
                180,
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        record = json.loads((state / "ota" / "slots.json").read_text())
        seen = len(_audit_states(cloud, slot.device_id, version))
        proc = _start(path, log)
        try:
            _wait(
                "the state after the restart",
                lambda n=seen: len(_audit_states(cloud, slot.device_id, version)) > n,
                proc,
                log,
                120,
            )
            first = _audit_states(cloud, slot.device_id, version)[seen]
            expected = {"active": "active", "confirmed": "confirmed"}.get(record["state"], "failed")
            assert first == expected, (kill_at, record["state"], first)
            _wait("a report", lambda: _report(state).get("state") == "listening", proc, log, 60)
            _wait(
                f"the update done after a kill in {kill_at}",
                lambda n=seen: "confirmed" in _audit_states(cloud, slot.device_id, version)[n:],
                proc,
                log,
                180,
            )
            report = _report(state)
            assert report["state"] == "listening"
            assert report["model"]["adapter_version"] == version
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
