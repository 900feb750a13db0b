"""OTA benchmarks: bytes on the wire per update, and one update rolled out to 200 devices.

Both run the production code paths in one process: the TUF repository
(``cloud_sidecar.tuf_repo``), the sidecar's ``ChunkServer``, each device's
``MqttRequester`` → ``ChunkFetcher`` → ``TufUpdateClient`` → ``TufUpdateWorker`` →
``SlotManager``, with request and response passing through the real codec but not
through a broker (the broker path is tests/integration/test_ota_tuf_live.py; its
figure for one device is within 0.01 of the in-process one). The online key is a
software key behind ``HsmSigner`` (a bench machine has no SoftHSM token); model
building is the file-backed stand-in of the slot tests: what is measured is
transport, verification and the lifecycle, not the int8 merge.

Needs python-tuf (docs/adr/0016); ``benchmarks.run`` skips this section without it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fleet_protocol.io.files import file_sha256, write_atomic

log = logging.getLogger(__name__)

ADAPTER_BYTES = 300 * 1024  # about the demo's edge adapter
DEVICES = 200
BASE = "b" * 64
FORMAT = "lora-edge-v1"


def _repository(d: Path) -> Any:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from cloud_sidecar.tuf_repo import TufRepository
    from cloud_sidecar.tuf_signer import FileRootKeys, HsmSigner

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    online = HsmSigner(pem, lambda dg: key.sign(dg, ec.ECDSA(Prehashed(hashes.SHA256()))))
    roots = FileRootKeys(d / "root-keys").ensure()
    return TufRepository.create(d / "repo", root_signers=roots, root_threshold=2, online=online)


def _build(adapter: Path, out_dir: Path) -> Path:
    """Stand-in for the int8 merge: the slot holds the adapter bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "model.bin", adapter.read_bytes(), 0o644)
    return out_dir / "model.bin"


def _load(path: Path | None) -> str:
    return "base" if path is None else file_sha256(path)


def run_ota(devices: int = DEVICES) -> dict[str, float]:
    from cloud_sidecar.ota_serve import ChunkServer
    from cloud_sidecar.tuf_repo import AdapterCustom, Expiry
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
        repo.add_target("adapter-v1.bin", adapter, AdapterCustom(BASE, FORMAT, 1))
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
                    state / "ota" / "clock.json", timestamp_lifetime=Expiry().timestamp
                ),
            )
            client.bootstrap(root)
            states: list[str] = []
            slots: SlotManager[str] = SlotManager(
                state,
                build=_build,
                load=_load,
                shadow_check=lambda m: "",
                swap=lambda c: None,
                report=lambda s, v, r: states.append(s),
                policy=HealthPolicy(min_windows=5),
            )
            slots.recover()
            worker = TufUpdateWorker(
                client,
                slots,
                FailureLedger(state / "ota" / "failures.json", limits),
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
    return {
        "ota.wire_overhead": one_bytes / ADAPTER_BYTES,
        "ota.rollout_200_inproc_seconds": elapsed,
        "ota.rollout_200_inproc_failures": float(devices - confirmed),
        "ota.adapter_bytes": float(ADAPTER_BYTES),
    }
