"""Insider paths with the real components (issue 9): SoftHSM, swtpm, Mosquitto, the store.

- a claim row written straight into the store (an insider with write access to it, but
  not to the HSM) enrolls nobody: the record must be the HSM's MAC (``claim-mac``);
- a service identity cannot be claimed;
- a wrong HSM PIN is presented to the token once: the reopen loop stops and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sidecar.errors import ConfigError
from devstack.softhsm import init_token
from edge_daemon.errors import EnrollmentError
from fleet_protocol import enroll

from .conftest import Cloud
from .test_enrollment import do_enroll, fleet_of, new_device

pytestmark = pytest.mark.integration


def test_a_claim_an_insider_wrote_into_the_store_enrolls_nobody(cloud: Cloud) -> None:
    forged = enroll.Claim.new()
    cloud.app.store.add_claim(
        forged.claim_id,
        "ins-forged",
        enroll.token_hash(forged.token),  # what the store held before issue 9
        int(time.time() * 1000) + 600_000,
    )
    with new_device(cloud, "ins-forged") as dev, pytest.raises(EnrollmentError) as e:
        do_enroll(cloud, dev, forged)
    assert e.value.reason == "bad_token"
    assert cloud.app.store.device("ins-forged") is None
    claim = fleet_of(cloud).create_claim("ins-real")  # the HSM-bound claim works
    with new_device(cloud, "ins-real") as dev:
        assert do_enroll(cloud, dev, claim).path.exists()


@pytest.mark.parametrize("name", ["cloud-sidecar", "cloud-sidecar-ingest-1"])
def test_a_service_identity_cannot_be_claimed(cloud: Cloud, name: str) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        fleet_of(cloud).create_claim(name)


_PIN_SCRIPT = """
import sys, threading
from pathlib import Path
from types import SimpleNamespace
from cloud_sidecar.app import SidecarApp
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import HsmConfig
from cloud_sidecar.errors import HsmPinError
from cloud_sidecar.keys.hsm import Hsm

module, label, good, work = sys.argv[1:5]
for attempt in (1, 2):
    try:
        Hsm(module, label, "not-the-pin")
    except HsmPinError as e:
        print(f"attempt {attempt}: {e}")
pin = Path(work) / "pin"
pin.write_text("not-the-pin")
cfg = SimpleNamespace(hsm=HsmConfig(module=module, token_label=label, pin_file=pin, region="eu-west-1"))
app = SidecarApp(cfg)
app.hsm = SimpleNamespace(close=lambda: None)
app.audit = AuditLog(Path(work) / "audit.jsonl", "eu-west-1")
loop = threading.Thread(target=app._reopen_hsm, daemon=True)
loop.start()
loop.join(10)
print("loop alive:", loop.is_alive())
print("refused:", app.metrics.get("hsm_pin_refused_total"))
with Hsm(module, label, good) as hsm:
    hsm.ensure_keys()
    print("mac bytes:", len(hsm.claim_mac(b"x")))
"""


def test_a_wrong_hsm_pin_is_tried_once_and_the_reopen_loop_stops(tmp_path: Path) -> None:
    """In a child process: its own PKCS#11 library state and SoftHSM configuration."""
    token = init_token(tmp_path / "hsm", label="pin-test")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PIN_SCRIPT,
            str(token.module),
            token.label,
            token.user_pin,
            str(tmp_path),
        ],
        env={**os.environ, **token.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("attempt 1: token 'pin-test' refused the PIN")
    assert "not trying it again" in lines[1]
    assert "loop alive: False" in lines  # before issue 9: retried until the token locked
    assert "refused: 1" in lines
    assert "mac bytes: 32" in lines  # the token is not locked, and the claim MAC works
