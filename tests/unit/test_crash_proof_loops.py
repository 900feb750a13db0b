"""No thread of either service dies of input (issue 9): each loop catches, counts, logs.

Pure logic with in-memory fakes; the OTA document checks use software keys. The broker
path (a handler raising on the real network thread) is in
tests/integration/test_broker_identity.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from edge_daemon.enroll import Renewer
from edge_daemon.errors import InferenceError, KeyStoreError
from edge_daemon.ota import InstalledModel, OtaClient
from edge_daemon.sensors.sampler import SensorSampler
from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import MetadataError, ProtocolError
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink
from fleet_protocol.messages import OtaStatus

KEY = ec.generate_private_key(ec.SECP256R1())
PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
NOW = dt.datetime.now(dt.UTC)


def _sign(d: bytes) -> bytes:
    return KEY.sign(d, ec.ECDSA(Prehashed(hashes.SHA256())))


def _verify(data: bytes) -> ota.VerifiedTargets:
    return ota.verify_targets(
        data, trusted_key_pem=PEM, trusted_keyid=key_id_from_pem(PEM), current_version=0, now=NOW
    )


# -- fleet_protocol.ota: canonicalised before the signature check -------------------------


@pytest.mark.parametrize(
    "doc",
    [
        b'{"signed":{"_type":"\\ud800"},"signatures":[]}',
        b'{"signed":{"\\udfff":1},"signatures":[{"keyid":"k","sig":"00"}]}',
        b'{"signed":{"targets":{"a":{"custom":"\\udbff\\udbff"}}},"signatures":[]}',
        b'{"signed":{"v":1e400},"signatures":[]}',
        b'{"signed":{"v":' + b"[" * 5000 + b"]" * 5000 + b'},"signatures":[]}',
    ],
)
def test_ota_metadata_nobody_signed_with_a_lone_surrogate_or_worse_is_a_metadata_error(
    doc: bytes,
) -> None:
    with pytest.raises(ProtocolError):
        _verify(doc)


def test_canonicalising_a_lone_surrogate_raises_metadata_error_not_unicode_error() -> None:
    with pytest.raises(MetadataError):
        ota.canonical({"x": "\ud800"})


# -- edge_daemon.ota: an update the backend cannot install --------------------------------


def _client(tmp: Path, install: Any, statuses: list[OtaStatus]) -> OtaClient:
    base = tmp / "base.onnx"
    base.write_bytes(b"base")
    subscribed: list[str] = []

    def apply(_base: Path, adapter: Path, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(adapter.read_bytes())
        return out

    client = OtaClient(
        device_id="pi-00",
        channel="stable",
        state_dir=tmp,
        trusted_key_pem=PEM,
        base_fp32=base,
        base_sha256="0" * 64,
        limits=ota.OtaLimits(),
        subscribe=subscribed.append,
        publish_status=statuses.append,
        install=install,
        apply_adapter=apply,
    )
    client.subscribed = subscribed  # type: ignore[attr-defined]
    return client


def test_an_update_the_backend_refuses_is_reported_failed_and_not_fetched_again(
    tmp_path: Path,
) -> None:
    """A Hailo device cannot run an adapter-merged model: ``_install`` raises
    ``InferenceError``. Before issue 9 that escaped ``handle`` and nothing was reported."""
    artifact = b"adapter bytes"
    target = ota.TargetInfo(
        "adapter-v1.safetensors",
        len(artifact),
        hashlib.sha256(artifact).hexdigest(),
        "0" * 64,
        ADAPTER_FORMAT,
        "all",
        1,
    )
    meta = ota.build_targets(
        version=1,
        expires=NOW + dt.timedelta(days=1),
        targets=(target,),
        keyid=key_id_from_pem(PEM),
        sign_digest=_sign,
    )

    def install(_m: InstalledModel) -> None:
        raise InferenceError("Hailo backend runs only the base HEF")

    statuses: list[OtaStatus] = []
    client = _client(tmp_path, install, statuses)
    client.handle(client.metadata_topic, meta)
    client.handle(topics.ota_artifact("stable", target.name), artifact)  # must not raise
    assert [(s.state, s.reason) for s in statuses] == [("failed", "InferenceError")]
    assert client.state.adapter_version == 0  # the trusted state is untouched
    client.handle(client.metadata_topic, meta)  # retained metadata again (a reconnect)
    assert client.subscribed == [topics.ota_artifact("stable", target.name)]  # type: ignore[attr-defined]


# -- edge_daemon.enroll.Renewer: the certificate must not expire for want of a thread ------


class _DueIdentity:
    """A certificate past its renewal point and not yet expired: the renewer renews."""

    def current(self) -> Any:
        return SimpleNamespace(renew_due=lambda _f: True, expired=lambda: False)


class _FlakyRenewer(Renewer):
    def __init__(self, failures: list[Exception]) -> None:
        super().__init__(
            "pi-00",
            _sign,
            "0" * 16,
            _DueIdentity(),  # type: ignore[arg-type]
            SimpleNamespace(),  # type: ignore[arg-type]
            b"",
            check_every_s=0.01,
        )
        self._failures = failures

    def renew_once(self) -> Any:
        if self._failures:
            raise self._failures.pop(0)
        self.renewed += 1
        return None


def test_the_renewer_survives_a_tpm_error_or_a_bug_and_renews_on_a_later_try() -> None:
    renewer = _FlakyRenewer([KeyStoreError("TPM busy"), ValueError("unforeseen")])
    stop = threading.Event()
    renewer.start(stop)
    deadline = time.monotonic() + 10
    while renewer.renewed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    renewer.join()
    assert renewer.renewed >= 1
    assert renewer.faults.counts() == {"renewer/KeyStoreError": 1, "renewer/ValueError": 1}


# -- sensor sampling ---------------------------------------------------------------------


def test_the_sensor_thread_survives_a_failing_sink_and_counts_it() -> None:
    calls: list[int] = []

    class Sink:
        def emit(self, readings: Any, period_ms: int) -> None:
            calls.append(period_ms)
            if len(calls) == 1:
                raise RuntimeError("store locked")

    faults = LoopFaults()
    sampler = SensorSampler([], Sink(), 0.01, faults)  # type: ignore[arg-type]
    stop = threading.Event()
    sampler.start(stop)
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    sampler.join()
    assert len(calls) >= 3
    assert faults.counts() == {"sensors/RuntimeError": 1}


# -- the MQTT network thread -------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    c, k = tmp / "c.pem", tmp / "k.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


def test_a_handler_exception_on_the_network_thread_is_counted_and_the_next_message_served(
    tmp_path: Path,
) -> None:
    cert, key = _self_signed(tmp_path)
    seen: list[bytes] = []
    counted: list[tuple[str, str]] = []

    def on_message(_topic: str, payload: bytes) -> None:
        seen.append(payload)
        json.loads(payload)  # UnicodeDecodeError / JSONDecodeError on bad input

    link = MqttLink(
        MqttEndpoint("127.0.0.1", 1, cert, cert, key),
        "c",
        on_message,
        faults=LoopFaults(lambda loop, kind: counted.append((loop, kind))),
    )
    for payload in (b"\xff", b"{}"):
        link._handle_message(None, None, SimpleNamespace(topic="t", payload=payload))  # type: ignore[arg-type]
    assert seen == [b"\xff", b"{}"]
    assert counted == [("mqtt", "UnicodeDecodeError")]


# -- LoopFaults itself -------------------------------------------------------------------


def test_loop_faults_swallow_exceptions_and_a_broken_hook_but_never_system_exit() -> None:
    def hook(_loop: str, _kind: str) -> None:
        raise RuntimeError("metrics broken")

    faults = LoopFaults(hook)
    with faults.guard("x"):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    assert faults.total("x") == 1
    with pytest.raises(SystemExit), faults.guard("x"):
        raise SystemExit(3)
    assert faults.total() == 1


def test_the_sidecar_counts_loop_errors_as_a_prometheus_counter() -> None:
    from cloud_sidecar.app import SidecarApp

    app = SidecarApp(SimpleNamespace(stall_s=30))  # type: ignore[arg-type]
    with app.faults.guard("mqtt"):
        raise ValueError("bad input")
    assert app.metrics.get("loop_errors_total", loop="mqtt", kind="ValueError") == 1
    assert 'sidecar_loop_errors_total{kind="ValueError",loop="mqtt"} 1.0' in app.metrics.render()


def test_the_bounded_worker_drops_and_counts_when_full_and_survives_its_handler() -> None:
    from fleet_protocol.io.guard import BoundedWorker

    seen: list[bytes] = []
    gate = threading.Event()

    def handle(_topic: str, payload: bytes) -> None:
        gate.wait(5)
        seen.append(payload)
        if payload == b"bad":
            raise ValueError("bad request")

    faults = LoopFaults()
    worker = BoundedWorker("fleet", handle, faults, max_items=2)
    assert worker.offer("t", b"bad") and worker.offer("t", b"ok")
    assert not worker.offer("t", b"dropped")  # never blocks the caller (the MQTT thread)
    worker.start()
    gate.set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    assert seen == [b"bad", b"ok"] and worker.dropped == 1
    assert faults.counts() == {"fleet/ValueError": 1}
