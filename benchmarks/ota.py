"""OTA benchmarks: bytes on the wire per update, and one update rolled out to 200 devices.

``run_ota_broker`` (``ota.rollout_200_seconds``, ``ota.rollout_200_failures``,
``ota.wire_overhead``) goes through a real Mosquitto started by devstack (mTLS, the
per-device ACL), with the sidecar's ``SidecarApp`` serving in this process: its online
TUF roles signed in SoftHSM, its ``ChunkServer`` answering ``ota/request`` and its
device-message handler auditing every ``ota/status``. Each simulated device has its
own fleet-CA certificate (CN = device id) and its own MQTT connection (client id =
CN, so the broker's ACL confines it to its own subtree exactly as a Pi), and runs the
daemon's update path: ``MqttRequester`` → ``ChunkFetcher`` → ``TufUpdateClient``
(python-tuf ngclient, ``TrustedClock``) → ``TufUpdateWorker`` (its own thread, nudged
by the retained ``timestamp.json``) → ``SlotManager``, reporting each state as an
``OtaStatus`` on ``fleet/v1/<device>/ota/status``. What is simulated, per device: no
swtpm (the update path does not use the TPM; the state-file key is random), no audio
(the health window is fed five good windows, one per ``WINDOW_S``, once ACTIVE), the
int8 merge and the model load (a slot holds the adapter bytes), and the shadow check
(it only requires the verified golden clips: the update ships 40 of them, 12.8 KB,
downloaded and verified like the adapter). The clock starts when
the sidecar publishes the new target's metadata, all devices connected and idle; it
stops when a test observer (read-only ACL) has seen every device's CONFIRMED.

``run_ota`` (``ota.rollout_200_inproc_*``) runs the same device path in one process: the TUF repository
(``cloud_sidecar.tuf_repo``), the sidecar's ``ChunkServer``, each device's
``MqttRequester`` → ``ChunkFetcher`` → ``TufUpdateClient`` → ``TufUpdateWorker`` →
``SlotManager``, with request and response passing through the real codec but not
through a broker (the broker path is tests/integration/test_ota_tuf_live.py; its
figure for one device is within 0.01 of the in-process one). The online keys are
software keys behind ``HsmSigner`` (a bench machine has no SoftHSM token); model
building is the file-backed stand-in of the slot tests: what is measured is
transport, verification and the lifecycle, not the int8 merge.

Needs python-tuf (docs/adr/0016); ``benchmarks.run`` skips this section without it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fleet_protocol.io.files import file_sha256, write_atomic
from fleet_protocol.messages import OtaState

log = logging.getLogger(__name__)

ADAPTER_BYTES = 300 * 1024  # about the demo's edge adapter
DEVICES = 200
BASE = "b" * 64
FORMAT = "lora-edge-v1"
STATE_KEY = bytes(32 * [7])  # in process: the OTA state MAC key (a device derives it from its TPM)


def _repository(d: Path) -> Any:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from cloud_sidecar.tuf_repo import ONLINE_ROLES, TufRepository
    from cloud_sidecar.tuf_signer import FileRootKeys, HsmSigner

    def signer() -> HsmSigner:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return HsmSigner(pem, lambda dg: key.sign(dg, ec.ECDSA(Prehashed(hashes.SHA256()))))

    online = {role: signer() for role in ONLINE_ROLES}  # one key per online role
    roots = FileRootKeys(d / "root-keys").ensure()
    return TufRepository.create(d / "repo", root_signers=roots, root_threshold=2, online=online)


def _golden_clips() -> bytes:
    """A release's golden clips: 4 windows per class (40 of 20 x 8 features, float16)."""
    import numpy as np

    from fleet_model.golden import encode_golden

    rng = np.random.default_rng(0)
    return encode_golden(rng.random((40, 20, 8), dtype=np.float32), np.arange(40) % 10)


def _with_golden(version: int) -> Any:
    from cloud_sidecar.tuf_repo import AdapterCustom

    return AdapterCustom(BASE, FORMAT, version, "all", 100, f"golden-v{version}.bin", 0)


def _golden_delivered(model: str, golden: Any) -> str:
    """The shadow check's stand-in (no model runs here): the verified clips must be there."""
    return "" if golden is not None and golden.path.stat().st_size > 0 else "no_golden"


def _build(adapter: Path, out_dir: Path) -> Path:
    """Stand-in for the int8 merge: the slot holds the adapter bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "model.bin", adapter.read_bytes(), 0o644)
    return out_dir / "model.bin"


def _load(path: Path | None) -> str:
    return "base" if path is None else file_sha256(path)


def run_ota(devices: int = DEVICES) -> dict[str, float]:
    from cloud_sidecar.ota_serve import ChunkServer
    from cloud_sidecar.tuf_repo import Expiry
    from edge_daemon.ota_clock import TrustedClock
    from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger
    from edge_daemon.ota_link import MqttRequester
    from edge_daemon.ota_slots import HealthPolicy, SlotManager
    from edge_daemon.ota_tuf import TufUpdateClient
    from edge_daemon.ota_update import TufUpdateWorker
    from fleet_protocol.ota_transfer import TransferLimits

    limits = TransferLimits(rate_bytes_per_s=10**10)
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp_s:
        tmp = Path(tmp_s)
        repo = _repository(tmp / "cloud")
        adapter = os.urandom(ADAPTER_BYTES)
        repo.add_target("adapter-v1.bin", adapter, _with_golden(1), _golden_clips())
        root = (repo.metadata_dir / "1.root.json").read_bytes()

        def device(i: int) -> tuple[int, float, str]:
            dev_id = f"dev-{i:03d}"
            state = tmp / dev_id
            requester: MqttRequester

            def to_device(topic: str, payload: bytes, corr: bytes | None) -> bool:
                requester.deliver(topic, payload, None, corr)
                return True

            server = ChunkServer(repo.dir, to_device, limits)

            def to_server(topic: str, payload: bytes, response_topic: str, corr: bytes) -> bool:
                server.handle(topic, payload, response_topic, corr)
                return True

            requester = MqttRequester(dev_id, to_server, timeout_s=30)
            fetcher = ChunkFetcher(requester, state, limits, sleep=lambda s: None)
            client = TufUpdateClient(
                state,
                fetcher,
                device_id=dev_id,
                base_sha256=BASE,
                adapter_format=FORMAT,
                clock=TrustedClock(
                    state / "ota" / "clock.json",
                    state_key=STATE_KEY,
                    timestamp_lifetime=Expiry().timestamp,
                ),
                state_key=STATE_KEY,
            )
            client.bootstrap(root)
            states: list[str] = []
            slots: SlotManager[str] = SlotManager(
                state,
                build=_build,
                load=_load,
                shadow_check=_golden_delivered,
                swap=lambda c: None,
                report=lambda s, v, r: states.append(s),
                policy=HealthPolicy(min_windows=5),
            )
            slots.recover()
            worker = TufUpdateWorker(
                client,
                slots,
                FailureLedger(state / "ota" / "failures.json", limits, state_key=STATE_KEY),
                lambda *a: None,
            )
            worker.run_once()
            for _ in range(5):  # the health window: five good windows
                slots.observe(True, 0.01, 0.9)
            return fetcher.stats.response_bytes, time.monotonic(), slots.record.state

        t0 = time.monotonic()
        one_bytes, _, _ = device(0)
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(device, range(1, devices + 1)))
        elapsed = max(t for _, t, _ in results) - t0
    confirmed = sum(1 for _, _, s in results if s == "confirmed")
    log.info("OTA: %d/%d devices confirmed in %.1f s", confirmed, devices, elapsed)
    log.info("OTA in process: one device received %.4f x the adapter", one_bytes / ADAPTER_BYTES)
    return {
        "ota.rollout_200_inproc_seconds": elapsed,
        "ota.rollout_200_inproc_failures": float(devices - confirmed),
        "ota.adapter_bytes": float(ADAPTER_BYTES),
    }


# -- through the broker -----------------------------------------------------------------

WINDOW_S = 0.05  # one simulated classified window (the health window needs five)
OBSERVER = "ota-bench-observer"
FINAL_STATES = ("confirmed", "failed", "rolled_back", "rejected")


class SimDevice:
    """One simulated device: its own mTLS session and the daemon's TUF update path."""

    def __init__(
        self,
        endpoint: Any,
        device_id: str,
        channel: str,
        root: bytes,
        state_dir: Path,
        lifetime: Any,
    ) -> None:
        from edge_daemon.ota_clock import TrustedClock
        from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger
        from edge_daemon.ota_link import MqttRequester
        from edge_daemon.ota_slots import HealthPolicy, SlotManager
        from edge_daemon.ota_state import derive_state_key
        from edge_daemon.ota_tuf import TufUpdateClient
        from edge_daemon.ota_update import TufUpdateWorker
        from fleet_protocol import topics
        from fleet_protocol.io.mqtt import MqttLink
        from fleet_protocol.ota_transfer import TransferLimits

        self.device_id = device_id
        state_key = derive_state_key(os.urandom(32))  # stands in for the TPM-sealed key
        self.status_topic = topics.ota_status(device_id)
        self.timestamp_topic = topics.ota_tuf_metadata(channel, "timestamp.json")
        self._active = threading.Event()
        limits = TransferLimits()  # the daemon's defaults: 64 KiB chunks, 1 MiB/s
        self.link = MqttLink(
            endpoint,
            client_id=device_id,
            on_message=self._on_message,
            on_request=self._on_request,
        )
        self.requester = MqttRequester(
            device_id,
            lambda t, p, rt, c: self.link.publish(
                t, p, qos=1, timeout_s=5, response_topic=rt, correlation=c
            ),
            limits.request_timeout_s,
        )
        self.fetcher = ChunkFetcher(self.requester, state_dir, limits)
        client = TufUpdateClient(
            state_dir,
            self.fetcher,
            device_id=device_id,
            base_sha256=BASE,
            adapter_format=FORMAT,
            clock=TrustedClock(
                state_dir / "ota" / "clock.json", state_key=state_key, timestamp_lifetime=lifetime
            ),
            state_key=state_key,
        )
        client.bootstrap(root)
        self.slots: SlotManager[str] = SlotManager(
            state_dir,
            build=_build,
            load=_load,
            shadow_check=_golden_delivered,
            swap=lambda c: None,
            report=self._report,
            policy=HealthPolicy(min_windows=5),
        )
        self.slots.recover()
        ledger = FailureLedger(state_dir / "ota" / "failures.json", limits, state_key=state_key)
        self.worker = TufUpdateWorker(client, self.slots, ledger, self._report)
        self.link.subscribe(self.timestamp_topic, 1)
        self.link.subscribe(self.requester.response_topic, 1)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.timestamp_topic:
            self.worker.nudge()

    def _on_request(self, topic: str, payload: bytes, rt: str | None, corr: bytes | None) -> None:
        if topic == self.requester.response_topic:
            self.requester.deliver(topic, payload, rt, corr)
        else:
            self._on_message(topic, payload)

    def _report(self, state: OtaState, version: int, reason: str) -> None:
        from fleet_protocol.messages import OtaStatus

        status = OtaStatus(
            device=self.device_id,
            metadata_version=0,
            adapter_version=version,
            state=state,
            reason=reason[:64],
            model_sha256="",
        )
        self.link.publish(self.status_topic, status.to_bytes(), qos=1, timeout_s=2)
        if state == "active":
            self._active.set()

    def start(self, stop: threading.Event) -> None:
        self.link.start(wait_s=30)
        self.worker.start(stop)
        threading.Thread(target=self._listen, args=(stop,), daemon=True).start()

    def _listen(self, stop: threading.Event) -> None:
        """The listener's part: classified windows feed the health window while ACTIVE."""
        while not stop.is_set():
            if not self._active.wait(1.0):
                continue
            while self.slots.record.state == "active" and not stop.wait(WINDOW_S):
                self.slots.observe(True, 0.01, 0.9)
            self._active.clear()

    def stop(self) -> None:
        self.worker.join(5)
        self.link.stop()


class _Observer:
    """Reads every device's ``ota/status`` on the broker (observer ACL: read only)."""

    def __init__(self, stack: Any, version: int, expected: int) -> None:
        from fleet_protocol import topics
        from fleet_protocol.io.mqtt import MqttLink

        self.version = version
        self.final: dict[str, tuple[str, float]] = {}
        self.done = threading.Event()
        self.expected = expected
        self._lock = threading.Lock()
        self.link = MqttLink(
            stack.endpoint(stack.observer_certs[OBSERVER]), OBSERVER, self._on_message
        )
        self.link.subscribe(topics.ota_status(topics.ANY), 1)

    def _on_message(self, topic: str, payload: bytes) -> None:
        msg = json.loads(payload)
        if msg.get("adapter_version") != self.version or msg.get("state") not in FINAL_STATES:
            return
        with self._lock:
            self.final.setdefault(msg["device"], (msg["state"], time.monotonic()))
            if len(self.final) >= self.expected:
                self.done.set()

    def snapshot(self) -> dict[str, tuple[str, float]]:
        with self._lock:
            return dict(self.final)


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"OTA bench: {what} not reached in {timeout_s:.0f} s")
        time.sleep(0.2)


def run_ota_broker(devices: int = DEVICES, *, timeout_s: float = 600.0) -> dict[str, float]:
    """One update to ``devices`` simulated devices through Mosquitto; see the module doc."""
    saved = os.environ.get("SOFTHSM2_CONF")
    try:
        with tempfile.TemporaryDirectory(prefix="ota-broker-bench-") as tmp_s:
            return _run_broker(Path(tmp_s), devices, timeout_s)
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def _run_broker(tmp: Path, devices: int, timeout_s: float) -> dict[str, float]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cloud_sidecar.app import SidecarApp
    from cloud_sidecar.config import load_config
    from cloud_sidecar.connect import open_link
    from cloud_sidecar.ota_publish import open_repository
    from cloud_sidecar.store import Store
    from devstack.provision import cloud_config
    from devstack.stack import DevStack
    from fleet_protocol.io.mqtt import MqttLink

    stop = threading.Event()
    with DevStack(tmp / "stack", n_devices=0, observers=(OBSERVER,)) as stack:
        # no TPM and no enrollment here: the fleet opts out of attestation explicitly
        cfg = load_config(
            cloud_config(
                stack, tmp / "cloud" / "data", tmp / "no-base-model", allow_unattested_keys=True
            )
        )
        certs = {f"ota-{i:03d}": stack.ca.issue_client(f"ota-{i:03d}") for i in range(devices)}
        store = Store(cfg.data_dir / "store.sqlite3", cfg.region)
        for dev_id, pair in certs.items():  # the sidecar audits OTA status of registered devices
            cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
            pem = cert.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            store.register_device(dev_id, pem)
        store.close()
        app = SidecarApp(cfg)
        started = threading.Event()
        server = threading.Thread(target=app.run, args=(stop, started), daemon=True)
        fleet: list[SimDevice] = []
        observer: _Observer | None = None
        publisher: MqttLink | None = None
        try:
            server.start()
            if not started.wait(60):
                raise RuntimeError("sidecar did not start")
            repo = open_repository(cfg, app.hsm)
            channel = cfg.ota.channel

            # the OTA tree is written only by the OTA publisher's identity (ADR 0018)
            publisher = open_link(cfg, "bench-ota-publisher", ota_publisher=True)
            publisher.start(wait_s=15)

            def publish(topic: str, payload: bytes, retain: bool) -> bool:
                return publisher.publish(topic, payload, qos=1, retain=retain)

            repo.publish_metadata(channel, publish)
            root = (repo.metadata_dir / "1.root.json").read_bytes()
            lifetime = repo._expiry.timestamp
            for dev_id, pair in certs.items():
                fleet.append(
                    SimDevice(
                        stack.endpoint(pair), dev_id, channel, root, tmp / "dev" / dev_id, lifetime
                    )
                )
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(lambda d: d.start(stop), fleet))
            _wait(lambda: all(d.worker.rounds >= 1 for d in fleet), 180, "first round")
            observer = _Observer(stack, repo.next_adapter_version(), devices)
            observer.link.start(wait_s=15)
            before = [d.fetcher.stats.response_bytes for d in fleet]
            adapter = os.urandom(ADAPTER_BYTES)
            t0 = time.monotonic()
            repo.add_target(
                "adapter-v1.bin", adapter, _with_golden(observer.version), _golden_clips()
            )
            repo.publish_metadata(channel, publish)
            observer.done.wait(timeout_s)
            final = observer.snapshot()
            confirmed = [t for s, t in final.values() if s == "confirmed"]
            end = max(confirmed) if len(confirmed) == devices else time.monotonic()
            elapsed = end - t0
            wire = [d.fetcher.stats.response_bytes - b for d, b in zip(fleet, before, strict=True)]
        finally:
            stop.set()
            if publisher is not None:
                publisher.stop()
            if observer is not None:
                observer.link.stop()
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(lambda d: d.stop(), fleet))
            server.join(30)
    log.info("OTA via broker: %d/%d confirmed in %.1f s", len(confirmed), devices, elapsed)
    return {
        "ota.rollout_200_seconds": elapsed,
        "ota.rollout_200_failures": float(devices - len(confirmed)),
        "ota.rollout_devices": float(devices),
        "ota.wire_overhead": sum(wire) / len(wire) / ADAPTER_BYTES,
        "ota.adapter_bytes": float(ADAPTER_BYTES),
    }
