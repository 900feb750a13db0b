"""OTA through the real broker: the cloud signs with SoftHSM, the device verifies and applies.

The device holds only its base model and the pinned OTA public key; it applies the
adapter without downloading the base again. Forged metadata and a tampered artifact
are refused and leave the running model untouched.
"""

from __future__ import annotations

import hashlib
import json
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cloud_sidecar.lora import convert_for_edge, train_adapter
from cloud_sidecar.ota_repo import OtaRepository, Publication
from devstack.scene.windows import build_training_set
from edge_daemon.inference.adapter import merged_fp32_path
from edge_daemon.inference.backends import LiteRtBackendConfig, ModelFiles, make_classifier
from edge_daemon.inference.onnx_backend import OnnxClassifier
from edge_daemon.ota import InstalledModel, OtaClient
from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota, topics
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.messages import OtaStatus

from .conftest import Cloud

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge_adapter(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    x, y = build_training_set(np.random.default_rng(3), 6, ("hilo",))
    out = tmp_path_factory.mktemp("adapter")
    peft_dir = train_adapter(base_model, x, y, replay=None, out_dir=out / "peft", rank=2, epochs=1)
    return convert_for_edge(peft_dir, base_model)


@dataclass
class EdgeOta:
    client: OtaClient
    installed: queue.Queue[InstalledModel] = field(default_factory=queue.Queue)
    statuses: queue.Queue[OtaStatus] = field(default_factory=queue.Queue)


@contextmanager
def edge(cloud: Cloud, base_model: Any, tmp: Path, channel: str) -> Iterator[EdgeOta]:
    """A device's OTA client on its own MQTT session (messages handled inline)."""
    slot = cloud.stack.devices[0]
    holder: list[EdgeOta] = []
    link = MqttLink(
        cloud.stack.endpoint(slot.cert),
        client_id=slot.device_id,
        on_message=lambda t, p: holder[0].client.handle(t, p),  # noqa: PLW0108 - late binding: the client exists only after the link
    )
    statuses: queue.Queue[OtaStatus] = queue.Queue()
    installed: queue.Queue[InstalledModel] = queue.Queue()
    client = OtaClient(
        device_id=slot.device_id,
        channel=channel,
        state_dir=tmp,
        trusted_key_pem=cloud.ota_pem.read_bytes(),
        base_fp32=base_model.onnx_fp32,
        base_sha256=base_model.sha256_fp32,
        limits=ota.OtaLimits(),
        subscribe=link.subscribe,
        publish_status=statuses.put,
        install=installed.put,
        apply_adapter=_apply,
    )
    holder.append(EdgeOta(client, installed, statuses))
    link.subscribe(client.metadata_topic, 1)
    link.start(wait_s=10)
    try:
        yield holder[0]
    finally:
        link.stop()


def _apply(base: Path, adapter: Path, out: Path) -> Path:
    from edge_daemon.inference.adapter import apply_adapter

    return apply_adapter(base, adapter, out)


def _hsm_signed(cloud: Cloud, repo: OtaRepository, base_model: Any, artifact: bytes) -> Publication:
    """Adapter v1 in ``repo``, its targets metadata signed by the sidecar's real HSM key."""
    return repo.add_adapter(
        artifact,
        base_model_sha256=base_model.sha256_fp32,
        adapter_version=1,
        cohort="all",
        expires_days=7,
        keyid=cloud.app.hsm.signing_key_id(),
        sign_digest=cloud.app.hsm.sign_digest,
    )


def _publish(cloud: Cloud, topic: str, payload: bytes) -> None:
    assert cloud.publisher.publish(topic, payload, qos=1, retain=True)


def test_signed_adapter_is_verified_and_applied_by_the_device(
    cloud: Cloud, base_model: Any, edge_adapter: bytes, tmp_path: Path
) -> None:
    repo = OtaRepository(tmp_path / "repo", "green", cloud.app.hsm.signing_public_key_pem())
    pub = _hsm_signed(cloud, repo, base_model, edge_adapter)
    assert repo.publish(pub, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r))
    with edge(cloud, base_model, tmp_path / "device", "green") as dev:
        model = dev.installed.get(timeout=60)
        status = dev.statuses.get(timeout=5)
    assert status.state == "applied" and status.adapter_version == 1
    assert model.path.exists()
    merged_fp32 = merged_fp32_path(model.path)
    assert merged_fp32.read_bytes() != base_model.onnx_fp32.read_bytes()  # the adapter was merged
    base = OnnxClassifier(base_model.onnx_int8)
    adapted = OnnxClassifier(model.path)
    x, _ = build_training_set(np.random.default_rng(9), 2)
    assert adapted.predict(x).shape == base.predict(x).shape
    # a LiteRT device runs the same install: the base's .tflite, merged weights patched in
    files = ModelFiles(merged_fp32, model.path, base_fp32=base_model.onnx_fp32)
    lite = make_classifier(LiteRtBackendConfig(), files, merged=True)
    diff = np.abs(lite.predict(x) - OnnxClassifier(merged_fp32).predict(x)).max()
    assert float(diff) <= 1e-4
    trusted = json.loads((tmp_path / "device" / "ota" / "trusted.json").read_text())
    assert trusted["metadata_version"] == 1 and trusted["adapter_version"] == 1


def test_metadata_signed_by_another_key_is_refused(
    cloud: Cloud, base_model: Any, edge_adapter: bytes, tmp_path: Path
) -> None:
    rogue = ec.generate_private_key(ec.SECP256R1())
    target = ota.TargetInfo(
        name="evil.safetensors",
        length=len(edge_adapter),
        sha256=hashlib.sha256(edge_adapter).hexdigest(),
        base_model_sha256=base_model.sha256_fp32,
        adapter_format=ADAPTER_FORMAT,
        cohort="all",
        adapter_version=9,
    )
    meta = ota.build_targets(
        version=5,
        expires=datetime.now(UTC) + timedelta(days=1),
        targets=(target,),
        keyid=cloud.app.hsm.signing_key_id(),  # claims the real key id
        sign_digest=lambda d: rogue.sign(d, ec.ECDSA(Prehashed(hashes.SHA256()))),
    )
    _publish(cloud, topics.ota_artifact("rogue", target.name), edge_adapter)
    _publish(cloud, topics.ota_metadata("rogue", "targets"), meta)
    with edge(cloud, base_model, tmp_path / "device", "rogue") as dev:
        status = dev.statuses.get(timeout=15)
        time.sleep(0.5)
        assert dev.installed.empty()
    assert (status.state, status.reason) == ("rejected", "bad_signature")
    assert not (tmp_path / "device" / "ota" / "trusted.json").exists()


def test_tampered_artifact_is_refused(
    cloud: Cloud, base_model: Any, edge_adapter: bytes, tmp_path: Path
) -> None:
    pub = _hsm_signed(
        cloud,
        OtaRepository(tmp_path / "repo", "amber", cloud.app.hsm.signing_public_key_pem()),
        base_model,
        edge_adapter,
    )
    bad = bytearray(edge_adapter)
    bad[len(bad) // 2] ^= 0xFF
    _publish(cloud, topics.ota_artifact("amber", pub.target.name), bytes(bad))
    _publish(cloud, topics.ota_metadata("amber", "targets"), pub.metadata)
    with edge(cloud, base_model, tmp_path / "device", "amber") as dev:
        status = dev.statuses.get(timeout=15)
        assert dev.installed.empty()
    assert (status.state, status.reason) == ("rejected", "bad_hash")
