"""Uploads through the real broker, signed by real TPMs (swtpm), unwrapped by SoftHSM.

A tampered upload is rejected (acked as rejected, nothing stored, audited) and the
sidecar keeps serving: the next good upload, from another device, is stored. The same
holds for the devices' JSON messages: an OTA status naming another device than its
topic is refused (counted, audited as ``message.rejected``) and the sidecar goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloud_sidecar.audit import verify
from devstack.provision import ACK_PUBLIC_KEY_FILE
from devstack.stack import DeviceSlot
from edge_daemon.keys.tpm import TpmKeyStore
from fleet_protocol import batch, envelope, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.messages import Ack, OtaStatus

from .conftest import Cloud

pytestmark = pytest.mark.integration
_SEQ: dict[str, int] = {}  # per-device sequence, as a device's buffer would persist it


@dataclass
class Device:
    slot: DeviceSlot
    keys: TpmKeyStore
    link: MqttLink
    acks: queue.Queue[Ack]

    def seal(
        self, cloud: Cloud, n: int = 2, wrap_pem: bytes | None = None, seq: int | None = None
    ) -> bytes:
        metas = tuple(
            batch.SampleMeta(
                sample_id=os.urandom(16).hex(),
                captured_at_ms=1,
                stream_offset_s=float(i),
                predicted="horn",
                score=0.4,
                model_sha256="ab" * 32,
                reason="low_confidence",
            )
            for i in range(n)
        )
        plain = batch.encode(
            batch.Batch(self.slot.device_id, metas, np.zeros((n, N_BANDS, N_FRAMES), np.float16))
        )
        pem = wrap_pem or cloud.unwrap_pem.read_bytes()
        if seq is None:
            _SEQ[self.slot.device_id] = seq = _SEQ.get(self.slot.device_id, 0) + 1
        return envelope.seal(
            plain,
            device=self.slot.device_id,
            batch_id=os.urandom(16).hex(),
            seq=seq,
            created_at_ms=int(time.time() * 1000),
            wrap_public_key_pem=pem,
            kid_wrap=key_id_from_pem(pem),
            kid_sig=self.keys.signing_key_id(),
            sign_digest=self.keys.sign_digest,
        )

    def send(self, payload: bytes, timeout: float = 15) -> Ack:
        assert self.link.publish(topics.upload(self.slot.device_id), payload)
        return self.acks.get(timeout=timeout)


@contextmanager
def device(cloud: Cloud, index: int) -> Iterator[Device]:
    with device_for(cloud, cloud.stack.devices[index]) as d:
        yield d


@contextmanager
def device_for(cloud: Cloud, slot: DeviceSlot) -> Iterator[Device]:
    """A device's own MQTT session (its certificate) and TPM, listening for its acks."""
    acks: queue.Queue[Ack] = queue.Queue()
    link = MqttLink(
        cloud.stack.endpoint(slot.cert),
        client_id=slot.device_id,
        on_message=lambda _t, p: acks.put(Ack.from_bytes(p)),
        subscriptions=[(topics.ack(slot.device_id), 1)],
    )
    link.start(wait_s=10)
    time.sleep(0.3)  # let the ack subscription settle
    with TpmKeyStore(slot.tpm.tcti, slot.state_dir / "keys") as keys:
        try:
            yield Device(slot, keys, link, acks)
        finally:
            link.stop()


def test_signed_upload_is_stored_and_acknowledged(cloud: Cloud) -> None:
    before = cloud.app.store.counts()["samples"]
    with device(cloud, 0) as d:
        ack = d.send(d.seal(cloud, n=3))
    assert ack.status == "stored"
    assert cloud.app.store.counts()["samples"] == before + 3


def test_tampered_upload_is_rejected_and_the_sidecar_keeps_serving(cloud: Cloud) -> None:
    audit_before = verify(cloud.app.audit.path)
    samples_before = cloud.app.store.counts()["samples"]
    with device(cloud, 0) as a:
        tampered = bytearray(a.seal(cloud))
        tampered[-20] ^= 0x01
        ack = a.send(bytes(tampered))
    assert (ack.status, ack.reason) == ("rejected", "bad_signature")
    assert cloud.app.store.counts()["samples"] == samples_before
    assert cloud.app.metrics.get("ingest_rejected_total", reason="bad_signature") >= 1
    assert verify(cloud.app.audit.path) == audit_before + 1
    with device(cloud, 1) as b:
        assert b.send(b.seal(cloud)).status == "stored"
    assert cloud.app.store.counts()["samples"] == samples_before + 2


def test_replayed_upload_is_not_stored_twice(cloud: Cloud) -> None:
    with device(cloud, 1) as d:
        first = d.seal(cloud)
        assert d.send(first).status == "stored"
        n = cloud.app.store.counts()["samples"]
        again = d.send(first)
    assert again.status == "stored" and again.reason == "duplicate"
    assert cloud.app.store.counts()["samples"] == n


def test_device_cannot_upload_as_another_device(cloud: Cloud) -> None:
    """The broker's ACL stops pi-00 publishing on pi-01's topic: nothing is ingested."""
    n = cloud.app.store.counts()["batches"]
    with device(cloud, 0) as a:
        a.link.publish(topics.upload(cloud.stack.devices[1].device_id), a.seal(cloud), timeout_s=2)
        time.sleep(1.0)
    assert cloud.app.store.counts()["batches"] == n


def _reseq(d: Device, cloud: Cloud) -> bytes:
    """An upload reusing an old sequence number (a replayed counter)."""
    current = _SEQ[d.slot.device_id]
    _SEQ[d.slot.device_id] = 0
    try:
        return d.seal(cloud)
    finally:
        _SEQ[d.slot.device_id] = current


def _oversized(d: Device, cloud: Cloud) -> bytes:
    return b"SEV1" + b"\0" * (9 * 1024 * 1024)


def _unknown_algorithm(d: Device, cloud: Cloud) -> bytes:
    return d.seal(cloud).replace(b'"aead":"A256GCM"', b'"aead":"A128GCM"', 1)


def _tampered_header(d: Device, cloud: Cloud) -> bytes:
    sealed = d.seal(cloud)
    start = sealed.index(b'"created_at_ms":') + len(b'"created_at_ms":')
    digit = sealed[start : start + 1]
    return sealed[:start] + (b"1" if digit != b"1" else b"2") + sealed[start + 1 :]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_reseq, "replay"),
        (_oversized, "too_large"),
        (_unknown_algorithm, "unknown_algorithm"),
        (_tampered_header, "bad_signature"),
    ],
)
def test_each_rejection_stores_nothing_is_counted_audited_and_service_continues(
    cloud: Cloud, make: object, reason: str
) -> None:
    with device(cloud, 0) as a:
        assert a.send(a.seal(cloud)).status == "stored"  # establishes a sequence above 0
        samples = cloud.app.store.counts()["samples"]
        rejected = cloud.app.metrics.get("ingest_rejected_total", reason=reason)
        payload = make(a, cloud)  # type: ignore[operator]
        if reason in ("too_large", "unknown_algorithm"):
            # refused before the envelope parses: there is no batch id to acknowledge
            assert a.link.publish(topics.upload(a.slot.device_id), payload)
            time.sleep(2.0)
            assert a.acks.empty()
        else:
            ack = a.send(payload)
            assert (ack.status, ack.reason) == ("rejected", reason)
    assert cloud.app.store.counts()["samples"] == samples
    assert cloud.app.metrics.get("ingest_rejected_total", reason=reason) == rejected + 1
    last = cloud.app.audit.path.read_text().splitlines()[-1]
    assert '"ingest.rejected"' in last and f'"reason":"{reason}"' in last
    with device(cloud, 1) as b:
        assert b.send(b.seal(cloud)).status == "stored"


def test_unregistered_device_is_rejected(cloud: Cloud) -> None:
    slot = cloud.stack.add_device("pi-77")  # a certificate and a TPM, but never registered
    with device_for(cloud, slot) as stranger:
        ack = stranger.send(stranger.seal(cloud))
    assert (ack.status, ack.reason) == ("rejected", "unknown_device")
    assert cloud.app.metrics.get("ingest_rejected_total", reason="unknown_device") == 1


def _ota_status(device: str) -> bytes:
    return OtaStatus(
        device=device,
        metadata_version=2,
        adapter_version=1,
        state="applied",
        reason="",
        model_sha256="ab" * 32,
    ).to_bytes()


def _wait_for(what: str, check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_ota_status_naming_another_device_is_refused_and_the_sidecar_keeps_serving(
    cloud: Cloud,
) -> None:
    """pi-00 publishes, on its own topic, an OTA status that names pi-01."""
    metrics, audit_path = cloud.app.metrics, cloud.app.audit.path
    a_id, b_id = (s.device_id for s in cloud.stack.devices[:2])
    refused = metrics.get("message_rejected_total", kind="ota/status", reason="device_mismatch")
    applied = metrics.get("ota_status_total", state="applied")
    entries = verify(audit_path)
    with device(cloud, 0) as a:
        assert a.link.publish(topics.ota_status(a_id), _ota_status(b_id))
        _wait_for(
            "the refusal",
            lambda: (
                metrics.get("message_rejected_total", kind="ota/status", reason="device_mismatch")
                == refused + 1
            ),
        )
        assert metrics.get("ota_status_total", state="applied") == applied  # nothing accepted
        last = json.loads(audit_path.read_text().splitlines()[-1])
        assert (last["kind"], last["subject"]) == ("message.rejected", a_id)
        assert last["details"]["reason"] == "device_mismatch"
        assert verify(audit_path) == entries + 1
        # still serving: its own status is accepted, and another device's upload stored
        assert a.link.publish(topics.ota_status(a_id), _ota_status(a_id))
        _wait_for(
            "the valid status",
            lambda: metrics.get("ota_status_total", state="applied") == applied + 1,
        )
    with device(cloud, 1) as b:
        assert b.send(b.seal(cloud)).status == "stored"
    statuses = [json.loads(x) for x in audit_path.read_text().splitlines()]
    assert [e["subject"] for e in statuses if e["kind"] == "ota.device_status"][-1] == a_id


# -- docs/adr/0017: signed acks, out-of-order delivery, transient refusals, rotation -------


def _ack_pem(cloud: Cloud) -> bytes:
    return (cloud.unwrap_pem.parent / ACK_PUBLIC_KEY_FILE).read_bytes()


def test_acks_are_signed_by_the_tokens_ack_key_and_name_the_envelope(cloud: Cloud) -> None:
    with device(cloud, 0) as d:
        payload = d.seal(cloud)
        ack = d.send(payload)
    assert ack.status == "stored" and ack.digest == hashlib.sha256(payload).hexdigest()
    ack.verify(_ack_pem(cloud))


def test_uploads_arriving_out_of_order_over_the_broker_are_all_stored_once(cloud: Cloud) -> None:
    with device(cloud, 1) as d:
        top = _SEQ.get(d.slot.device_id, 0)
        early, late = d.seal(cloud, seq=top + 10), d.seal(cloud, seq=top + 11)
        before = cloud.app.store.counts()["batches"]
        assert [d.send(p).status for p in (late, early)] == ["stored", "stored"]
        assert [d.send(p).reason for p in (late, early)] == ["duplicate", "duplicate"]
        _SEQ[d.slot.device_id] = top + 11
    assert cloud.app.store.counts()["batches"] == before + 2


def test_an_upload_for_an_unwrap_key_the_token_lacks_is_kept_for_later(cloud: Cloud) -> None:
    other = rsa.generate_private_key(65537, 3072).public_key()
    pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    before = cloud.app.store.counts()["batches"]
    with device(cloud, 0) as d:
        ack = d.send(d.seal(cloud, wrap_pem=pem))
    assert (ack.status, ack.reason) == ("retry", "unknown_unwrap_key")
    ack.verify(_ack_pem(cloud))
    assert cloud.app.store.counts()["batches"] == before


def test_after_an_unwrap_key_rotation_batches_for_the_old_and_new_key_are_stored(
    cloud: Cloud,
) -> None:
    with device(cloud, 0) as d:
        in_flight = d.seal(cloud)  # sealed for the key devices hold now
        cloud.app.hsm.rotate_unwrap_key()
        fresh = d.seal(cloud, wrap_pem=cloud.app.hsm.unwrap_public_key_pem())
        assert [d.send(p).status for p in (fresh, in_flight)] == ["stored", "stored"]


def _data_key_entries(cloud: Cloud) -> list[dict[str, object]]:
    lines = (cloud.app.cfg.data_dir / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == "store.data_key_created"]


def test_stored_features_are_sealed_and_data_key_creation_and_rotation_are_audited(
    cloud: Cloud,
) -> None:
    """ADR 0022 on the serving path: the first stored batch makes the first data key
    (audited, reason "first"); `cloud-sidecar keys rotate-data-key` audits the next."""
    with device(cloud, 0) as d:
        assert d.send(d.seal(cloud, n=2)).status == "stored"
    entries = _data_key_entries(cloud)
    assert [e["details"]["reason"] for e in entries][:1] == ["first"]  # type: ignore[index]
    raw = cloud.app.store._db.execute("SELECT features FROM samples").fetchall()  # type: ignore[attr-defined]
    assert raw and all(bytes(r[0]).startswith(b"\x00SEF1") for r in raw)
    out = subprocess.run(
        [sys.executable, "-m", "cloud_sidecar", "keys", "rotate-data-key",
         "--config", str(cloud.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    kid = json.loads(out.stdout)["data_key"]
    last = _data_key_entries(cloud)[-1]
    assert last["subject"] == kid and last["details"]["reason"] == "rotated"  # type: ignore[index]
