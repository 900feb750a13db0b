"""A device offline longer than its certificate's lifetime comes back by itself and
loses nothing (docs/adr/0017).

Real components: Mosquitto (mTLS, ACL, the claim listener), one swtpm, a SoftHSM2 token,
the sidecar serving in this process (its CA issuing 20 s certificates for this test),
and ``edge-daemon run`` as its own process, enrolling with a one-time claim on first
start and replaying a street at real time. The broker is stopped after the first
acknowledged batch and stays down past the certificate's expiry while the device keeps
capturing and sealing batches. When it is back, the expired certificate no longer
passes the handshake; the daemon's renewer re-enrolls over the claim listener with its
registered TPM key (the claim is used up, no human in the loop), switches the link, and
every batch is then stored exactly once.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_sidecar.app import SidecarApp
from cloud_sidecar.config import load_config
from devstack.city import write_stream
from devstack.mosquitto import restart_broker, stop_broker
from devstack.provision import cloud_config, device_config, export_cloud_keys
from devstack.scene.stream import SceneSpec
from devstack.stack import DevStack
from tests.integration.conftest import base_model  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CERT_S = 20


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


def test_device_offline_past_its_certificate_reenrolls_and_every_batch_is_stored_once(
    tmp_path: Path,
    base_model: Any,  # noqa: F811
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        keys = export_cloud_keys(stack, tmp_path / "cloud-keys")
        app = SidecarApp(load_config(cloud_config(stack, tmp_path / "cloud", base_model.dir)))
        stop, started = threading.Event(), threading.Event()
        server = threading.Thread(target=app.run, args=(stop, started), daemon=True)
        server.start()
        assert started.wait(30) and app.fleet is not None
        app.fleet.ca.cert_valid = dt.timedelta(seconds=CERT_S)
        slot = stack.devices[0]
        claim = tmp_path / "claim.txt"
        claim.write_text(str(app.fleet.create_claim(slot.device_id)))
        start_ms = int(time.time() * 1000)
        wav = tmp_path / "street.wav"
        write_stream(SceneSpec(seed=5, duration_s=150, speech_rate=0.0), wav, start_ms)
        source = {"type": "file", "path": str(wav), "start_time_ms": start_ms, "realtime": True}
        selection = {"uplink_bytes_per_day": None, "audit_fraction": 1.0}
        path = device_config(stack, slot, base_model.dir, keys, source, claim, selection)
        cfg = json.loads(path.read_text())
        cfg["uplink"] = {"batch_samples": 4, "retry_s": 2.0}
        cfg["enrollment"] |= {"check_every_s": 1, "renew_at": 0.999}  # no renewal first
        path.write_text(json.dumps(cfg))
        state = Path(cfg["state_dir"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "daemon.log", "wb"),  # noqa: SIM115 - closed with it
        )

        def buffer() -> dict[str, int]:
            return dict(_report(state).get("buffer", {}))

        try:
            _wait("a first acknowledged batch", lambda: buffer().get("batches_acked", 0) >= 1,
                  proc, 180)  # fmt: skip
            assert not claim.exists()  # the claim is used up
            stop_broker(stack.procs, stack.broker)
            offline_from = buffer()
            time.sleep(CERT_S + 5)  # past the certificate's expiry, still capturing
            during = buffer()
            restart_broker(stack.procs, stack.broker)
            _wait("re-enrollment by the TPM key", lambda: app.metrics.get(
                "fleet_reenrolled_total") >= 1, proc, 180)  # fmt: skip

            def all_acked() -> bool:
                b = buffer()
                return b["batches"] == b["batches_acked"] and b["batches"] > during["batches"]

            _wait("every batch acknowledged", all_acked, proc, 120)
            final = buffer()
            stored = app.store.counts()["batches"]
            certificates = len(app.store.certificates(slot.device_id))
        finally:
            proc.terminate()
            proc.wait(30)
            stop.set()
            server.join(15)
        sealed_offline = during["batches"] - offline_from["batches"]
        print(
            f"batches sealed {final['batches']} (while offline {sealed_offline}),"
            f" acked {final['batches_acked']}, stored {stored}: lost"
            f" {final['batches'] - stored}, stored twice 0 (batch id is the store's key)"
        )
        assert sealed_offline >= 1, "no batch waited in the buffer through the outage"
        assert stored == final["batches"] == final["batches_acked"]
        assert certificates >= 2
