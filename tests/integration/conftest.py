"""Fixtures that start real components through devstack (no mocks of broker, TPM or HSM)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_sidecar.app import SidecarApp
from cloud_sidecar.config import load_config
from cloud_sidecar.connect import open_link
from cloud_sidecar.store import Store
from devstack.provision import cloud_config, export_cloud_keys
from devstack.stack import DevStack
from fleet_protocol.io.mqtt import MqttLink

LABEL_SOURCE = "incidents-test"  # a downstream label source with its own certificate


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A small base model, pretrained once per session (same code path as the demo).

    The synthetic city written as a dataset (6 clips of 1-4 s per class) and read back by
    ``cloud_sidecar.pretrain``, as ``cloud-sidecar pretrain --dataset`` does.
    """
    from devstack.dataset import pretrain_synthetic

    base_dir = tmp_path_factory.mktemp("base-model")
    return pretrain_synthetic(base_dir, seed=1, per_class=6, epochs=2)


@dataclass
class Cloud:
    stack: DevStack
    config: Path
    unwrap_pem: Path
    ota_pem: Path
    app: SidecarApp
    publisher: MqttLink  # the OTA publisher's identity: the only one that writes the OTA tree


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """Stack (broker, SoftHSM, 2 swtpm) + a sidecar serving in this process."""
    work = tmp_path_factory.mktemp("stack")
    saved = os.environ.get("SOFTHSM2_CONF")
    with DevStack(work, n_devices=2, label_sources=(LABEL_SOURCE,)) as stack:
        unwrap, ota_pem = export_cloud_keys(stack, work / "cloud-keys")
        cfg_path = cloud_config(stack, work / "cloud" / "data", work / "no-base-model")
        cfg = load_config(cfg_path)
        from edge_daemon.keys.tpm import TpmKeyStore

        store = Store(cfg.data_dir / "store.sqlite3", cfg.region)
        for slot in stack.devices:
            with TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys") as keys:
                store.register_device(slot.device_id, keys.signing_public_key_pem())
        store.close()
        app = SidecarApp(cfg)
        stop, started = threading.Event(), threading.Event()
        thread = threading.Thread(target=app.run, args=(stop, started), daemon=True)
        thread.start()
        assert started.wait(30), "sidecar did not start"
        publisher = open_link(cfg, "test-ota-publisher", ota_publisher=True)
        publisher.start(wait_s=15)
        try:
            yield Cloud(stack, cfg_path, unwrap, ota_pem, app, publisher)
        finally:
            publisher.stop()
            stop.set()
            thread.join(15)
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved
