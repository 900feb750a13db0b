"""The embedded default, composed: a SoftHSM token with the cloud's keys, the fleet CA
whose key is in that token, a file-key claim CA, Mosquitto with mTLS (a device listener
trusting the fleet CA, an enrollment listener trusting only the claim CA), and one swtpm
per simulated device, all on loopback.

The fleet CA (``ca``) signs through ``HsmCaSigner`` (cloud_sidecar/ca.py): its
certificate is made once here, self-signed inside the token; the broker's server
certificate, the sidecar's and the fixed device certificates are issued by it, so
clients trust one anchor (``ca.cert_path``). The claim CA (``claim_ca``) only issues
the shared claim certificate; its key file stands in for a factory/offline CA. The
service CA (``service_ca``) issues only the sidecar's certificates (serve's and the OTA publisher's, two CNs), which only the
broker's service listener accepts (free client ids there; on the device listener the
client id is the CN: issue 9).

``label_sources`` names downstream systems that send labels (the simulated city, a
test): the broker's ACL admits each as a label source (``fleet_protocol.acl``) and the
fleet CA issues each a client certificate (``label_source_certs[name]``), as it does for
the sidecar. ``observers`` (tests only) may read every topic and write none
(``observer_certs[name]``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cloud_sidecar.ca import HsmCaSigner, create_ca_certificate
from cloud_sidecar.keys.hsm import Hsm
from devstack.mosquitto import Broker, start_broker
from devstack.pki import CertPair, DevCA
from devstack.procs import ProcessGroup
from devstack.softhsm import HsmToken, init_token
from devstack.swtpm import EK_CA_CERT, Swtpm, start_swtpm
from fleet_protocol.io.mqtt import MqttEndpoint

log = logging.getLogger(__name__)
CLOUD_IDENTITY = "cloud-sidecar"
OTA_IDENTITY = "cloud-sidecar-ota"  # the OTA publisher: the only identity that writes the OTA tree
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
    label_sources: Sequence[str] = ()
    observers: Sequence[str] = ()
    procs: ProcessGroup = field(init=False)
    ca: DevCA = field(init=False)
    claim_ca: DevCA = field(init=False)
    service_ca: DevCA = field(init=False)
    broker: Broker = field(init=False)
    token: HsmToken = field(init=False)
    cloud_cert: CertPair = field(init=False)
    ota_cert: CertPair = field(init=False)
    claim_cert: CertPair = field(init=False)
    label_source_certs: dict[str, CertPair] = field(default_factory=dict, init=False)
    observer_certs: dict[str, CertPair] = field(default_factory=dict, init=False)
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
        self.token = init_token(self.workdir / "hsm")
        (self.workdir / "hsm" / "pin").write_text(self.token.user_pin)
        os.chmod(self.workdir / "hsm" / "pin", 0o600)
        os.environ.update(self.token.env())  # read by the PKCS#11 module when it loads
        with self.open_hsm() as hsm:
            hsm.ensure_keys()
        ca_cert = create_ca_certificate(self.open_hsm, "sovereign-edge dev fleet CA (HSM)")
        self.ca = DevCA.create_with_signer(self.workdir / "ca", HsmCaSigner(self.open_hsm, ca_cert))
        self.claim_ca = DevCA.create(self.workdir / "claim-ca", name="sovereign-edge claim CA")
        self.service_ca = DevCA.create(
            self.workdir / "service-ca", name="sovereign-edge service CA"
        )
        self._broker_dir = Path(tempfile.mkdtemp(prefix="sovereign-broker-"))
        os.chmod(self._broker_dir, 0o755)
        self.broker = start_broker(
            self.procs,
            self._broker_dir,
            self.ca,
            (CLOUD_IDENTITY,),
            claim_ca=self.claim_ca,
            label_sources=self.label_sources,
            observers=self.observers,
            service_ca=self.service_ca,
            ota_publishers=(OTA_IDENTITY,),
        )
        log.info(
            "broker on 127.0.0.1:%d (mTLS, per-device ACL), enrollment on %s",
            self.broker.port,
            self.broker.enroll_port,
        )
        self.cloud_cert = self.service_ca.issue_client(CLOUD_IDENTITY)
        self.ota_cert = self.service_ca.issue_client(OTA_IDENTITY)
        self.claim_cert = self.claim_ca.issue_client(CLAIM_IDENTITY, valid_days=365)
        for name in self.label_sources:
            self.label_source_certs[name] = self.ca.issue_client(name)
        for name in self.observers:
            self.observer_certs[name] = self.ca.issue_client(name)
        for i in range(self.n_devices):
            self.add_device(f"{self.device_prefix}-{i:02d}")

    @property
    def ek_ca_dir(self) -> Path:
        """The local "TPM manufacturer" CA that issues each swtpm's EK certificate."""
        return self.workdir / "ek-ca"

    @property
    def ek_ca_cert(self) -> Path:
        return self.ek_ca_dir / EK_CA_CERT

    def open_hsm(self) -> Hsm:
        """A session on the stack's token (the fleet CA key lives there)."""
        return Hsm(str(self.token.module), self.token.label, self.token.user_pin)

    def endpoint(self, pair: CertPair) -> MqttEndpoint:
        """The listener the holder of ``pair`` connects to: the service listener for the
        sidecar's certificate, else the device listener."""
        port = self.broker.port
        if pair in (self.cloud_cert, self.ota_cert) and self.broker.service_port is not None:
            port = self.broker.service_port
        return MqttEndpoint("127.0.0.1", port, self.ca.cert_path, pair.cert, pair.key)

    def add_device(self, device_id: str) -> DeviceSlot:
        state_dir = self.workdir / "devices" / device_id
        tpm = start_swtpm(self.procs, self.workdir / "tpm" / device_id, ek_ca_dir=self.ek_ca_dir)
        slot = DeviceSlot(device_id, tpm, self.ca.issue_client(device_id), state_dir)
        self.devices.append(slot)
        log.info("device %s: swtpm on port %d", device_id, tpm.port)
        return slot

    def close(self) -> None:
        if hasattr(self, "procs"):
            self.procs.close()
        if hasattr(self, "_broker_dir"):
            shutil.rmtree(self._broker_dir, ignore_errors=True)
