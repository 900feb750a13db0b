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
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.mosquitto import restart_broker, stop_broker
from devstack.stack import DevStack
from tests.integration.conftest import base_model  # noqa: F401 - the session fixture

from .daemon_run import (
    buffer_counts,
    daemon_config,
    serving_sidecar,
    start_daemon,
    stop_daemon,
    wait,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CERT_S = 20


def test_device_offline_past_its_certificate_reenrolls_and_every_batch_is_stored_once(
    tmp_path: Path,
    base_model: Any,  # noqa: F811
) -> None:
    with (
        DevStack(tmp_path / "stack", n_devices=1) as stack,
        serving_sidecar(stack, tmp_path, base_model) as app,
    ):
        assert app.fleet is not None
        app.fleet.ca.cert_valid = dt.timedelta(seconds=CERT_S)
        slot = stack.devices[0]
        path = daemon_config(stack, app, slot, tmp_path, base_model, 150, seed=5)
        cfg = json.loads(path.read_text())
        cfg["enrollment"] |= {"check_every_s": 1, "renew_at": 0.999}  # no renewal first
        path.write_text(json.dumps(cfg))
        state = Path(cfg["state_dir"])
        proc = start_daemon(path, tmp_path / "daemon.log")
        try:
            wait("a first acknowledged batch",
                 lambda: buffer_counts(state).get("batches_acked", 0) >= 1, proc, 180)  # fmt: skip
            assert not Path(cfg["enrollment"]["claim_file"]).exists()  # the claim is used up
            stop_broker(stack.procs, stack.broker)
            offline_from = buffer_counts(state)
            time.sleep(CERT_S + 5)  # past the certificate's expiry, still capturing
            during = buffer_counts(state)
            restart_broker(stack.procs, stack.broker)
            wait("re-enrollment by the TPM key",
                 lambda: app.metrics.get("fleet_reenrolled_total") >= 1, proc, 180)  # fmt: skip

            def all_acked() -> bool:
                b = buffer_counts(state)
                return b["batches"] == b["batches_acked"] and b["batches"] > during["batches"]

            wait("every batch acknowledged", all_acked, proc, 120)
            final = buffer_counts(state)
            stored = app.store.counts()["batches"]
            certificates = len(app.store.certificates(slot.device_id))
        finally:
            stop_daemon(proc)
    sealed_offline = during["batches"] - offline_from["batches"]
    print(
        f"batches sealed {final['batches']} (while offline {sealed_offline}),"
        f" acked {final['batches_acked']}, stored {stored}: lost"
        f" {final['batches'] - stored}, stored twice 0 (batch id is the store's key)"
    )
    assert sealed_offline >= 1, "no batch waited in the buffer through the outage"
    assert stored == final["batches"] == final["batches_acked"]
    assert certificates >= 2
