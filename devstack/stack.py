"""The embedded default, composed: dev CA, Mosquitto with mTLS, a SoftHSM token with the
cloud's keys, and one swtpm per simulated device, all on loopback.

``DevStack`` is a context manager. On enter it starts everything (each child through
one ``ProcessGroup``); on exit, also after an error or Ctrl-C, it stops every child by
PID in reverse order. Provisioning helpers write what a flashed device and the cloud
would hold: certificates, the pinned cloud public keys, per-device configs.

The broker's working directory lives in its own ``/tmp`` directory (mode 0755) because
Mosquitto, started as root, drops to the ``mosquitto`` user, which must reach it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from devstack.mosquitto import Broker, start_broker
from devstack.pki import CertPair, DevCA
from devstack.procs import ProcessGroup
from devstack.softhsm import HsmToken, init_token
from devstack.swtpm import Swtpm, start_swtpm

log = logging.getLogger(__name__)
CLOUD_IDENTITY = "cloud-sidecar"
CLAIM_IDENTITY = "claim"  # the shared enrollment certificate (cloud_sidecar/fleet.py reserves it)


@dataclass
class DeviceSlot:
    device_id: str
    tpm: Swtpm
    cert: CertPair
    state_dir: Path


@dataclass
class DevStack:
    workdir: Path
    n_devices: int = 3
    device_prefix: str = "pi"
    procs: ProcessGroup = field(init=False)
    ca: DevCA = field(init=False)
    broker: Broker = field(init=False)
    token: HsmToken = field(init=False)
    cloud_cert: CertPair = field(init=False)
    claim_cert: CertPair = field(init=False)
    devices: list[DeviceSlot] = field(default_factory=list, init=False)
    _broker_dir: Path = field(init=False)

    def __enter__(self) -> DevStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessGroup(self.workdir / "logs")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self.ca = DevCA.create(self.workdir / "ca")
        self._broker_dir = Path(tempfile.mkdtemp(prefix="sovereign-broker-"))
        os.chmod(self._broker_dir, 0o755)
        self.broker = start_broker(self.procs, self._broker_dir, self.ca, (CLOUD_IDENTITY,))
        log.info("broker on 127.0.0.1:%d (mTLS, per-device ACL)", self.broker.port)
        self.cloud_cert = self.ca.issue_client(CLOUD_IDENTITY)
        self.claim_cert = self.ca.issue_client(CLAIM_IDENTITY, valid_days=365)
        self.token = init_token(self.workdir / "hsm")
        (self.workdir / "hsm" / "pin").write_text(self.token.user_pin)
        os.chmod(self.workdir / "hsm" / "pin", 0o600)
        for i in range(self.n_devices):
            self.add_device(f"{self.device_prefix}-{i:02d}")

    def add_device(self, device_id: str) -> DeviceSlot:
        state_dir = self.workdir / "devices" / device_id
        tpm = start_swtpm(self.procs, self.workdir / "tpm" / device_id)
        slot = DeviceSlot(device_id, tpm, self.ca.issue_client(device_id), state_dir)
        self.devices.append(slot)
        log.info("device %s: swtpm on port %d", device_id, tpm.port)
        return slot

    def close(self) -> None:
        if hasattr(self, "procs"):
            self.procs.close()
        if hasattr(self, "_broker_dir"):
            shutil.rmtree(self._broker_dir, ignore_errors=True)
