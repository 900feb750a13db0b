"""Composition root of the edge daemon: builds components in order, stops them in reverse.

Start order: TPM key store → replay buffer (needs the sealed storage key) → classifier
(the installed adapter model if there is one, else the base, on the configured backend)
→ MQTT link (enrolling first when the device has no certificate) → certificate renewer
→ OTA client → sensors (and the resend of telemetry an outage held back). ``stop`` undoes
them in reverse.
The main thread runs the audio pipeline and then services acks, retries and updates;
MQTT callbacks only enqueue work or touch the thread-safe buffer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.capture import AudioSource, CaptureProcess, open_capture, open_source
from edge_daemon.config import DeviceConfig
from edge_daemon.enroll import device_endpoint, make_renewer
from edge_daemon.inference.backends import Classifier, ModelFiles, make_classifier
from edge_daemon.keys.tpm import TpmKeyStore
from edge_daemon.ota import InstalledModel, OtaClient
from edge_daemon.pipeline import Classified, EvalResult, evaluate, make_gate, run_stream
from edge_daemon.privacy.vad import SileroVad
from edge_daemon.selection import Selector
from edge_daemon.sensors.runtime import DeviceSensors
from fleet_protocol import batch, envelope, ota, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import file_sha256, write_atomic
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.messages import Ack, Event, OtaStatus
from fleet_protocol.telemetry import Telemetry

log = logging.getLogger(__name__)


class EdgeApp:
    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.device = cfg.device_id
        self.report: dict[str, Any] = {"device_id": self.device, "uplink_bytes": 0, "events": 0}
        self._ota_queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        self._sent_at: dict[str, float] = {}
        self._selector = Selector(
            cfg.selection, np.random.default_rng(int.from_bytes(os.urandom(8), "big"))
        )
        self._vad: SileroVad | None = None
        self._acked = threading.Event()  # set by the network thread: the report is stale

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.keys = TpmKeyStore(cfg.tpm.tcti, cfg.state_dir / "keys")
        self.buffer = ReplayBuffer(
            cfg.state_dir / "buffer.sqlite3",
            self.keys.storage_key(),
            cfg.selection.max_buffer_bytes,
        )
        self._unwrap_pem = cfg.cloud.unwrap_public_key.read_bytes()
        self._kid_wrap = envelope.key_id_from_pem(self._unwrap_pem)
        base = make_classifier(
            cfg.model.backend,
            ModelFiles(cfg.model.base_fp32, cfg.model.base_int8),
            cfg.model.threads,
        )
        self.base_sha256 = file_sha256(cfg.model.base_fp32)
        self.link = MqttLink(
            device_endpoint(cfg, self.keys),  # enrolls first when there is no certificate
            client_id=self.device,
            on_message=self._on_message,
        )
        self.renewer = make_renewer(cfg, self.keys, self.link)
        self._renew_stop = threading.Event()
        self.ota = OtaClient(
            device_id=self.device,
            channel=cfg.ota.channel,
            state_dir=cfg.state_dir,
            trusted_key_pem=cfg.cloud.ota_public_key.read_bytes(),
            base_fp32=cfg.model.base_fp32,
            base_sha256=self.base_sha256,
            limits=ota.OtaLimits(cfg.ota.max_metadata_bytes, cfg.ota.max_artifact_bytes),
            subscribe=self.link.subscribe,
            publish_status=self._publish_ota_status,
            install=self._install,
            apply_adapter=_apply_adapter,
        )
        installed = self.ota.installed()
        self.classifier = self._classifier_for(installed.path) if installed is not None else base
        self.report["adapter_version"] = installed.adapter_version if installed else 0
        self.link.subscribe(topics.ack(self.device), 1)
        self.link.subscribe(self.ota.metadata_topic, 1)
        if self.renewer is not None:
            self.link.subscribe(self.renewer.response_topic, 1)
        self.link.start(wait_s=0)
        if self.renewer is not None:
            self.renewer.start(self._renew_stop)
        self.sensors = DeviceSensors(
            cfg,
            self._publish_telemetry,
            link_up=lambda: self.link.connected,
            republish=self._republish_telemetry,
        )
        self.sensors.start()
        log.info(
            "edge daemon %s started (model %s)", self.device, self.classifier.model_sha256[:12]
        )

    def stop(self) -> None:
        self._renew_stop.set()
        if self.renewer is not None:
            self.renewer.join()
        if hasattr(self, "sensors"):
            self.sensors.close()
        for close in (self.link.stop, self.buffer.close, self.keys.close):
            try:
                close()
            except Exception:
                log.exception("error while stopping")

    # -- MQTT callbacks (network thread) ------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.renewer is not None and topic == self.renewer.response_topic:
            self.renewer.on_message(payload)
        elif topic == topics.ack(self.device):
            try:
                ack = Ack.from_bytes(payload)
            except ProtocolError as e:
                log.warning("ignored malformed ack: %s", e)
                return
            if ack.status == "rejected":
                log.error("cloud rejected batch %s: %s", ack.batch_id, ack.reason)
            if self.buffer.mark_acked(ack.batch_id):
                self._sent_at.pop(ack.batch_id, None)
                self._acked.set()
        else:
            try:
                self._ota_queue.put_nowait((topic, payload))
            except queue.Full:
                log.warning("OTA queue full; dropped a message on %s (it is retained)", topic)

    def _publish_telemetry(self, t: Telemetry) -> bool:
        return self.link.publish(topics.telemetry(self.device), t.to_bytes(), qos=0, timeout_s=0)

    def _republish_telemetry(self, t: Telemetry) -> bool:
        """Held-back telemetry (sensors/resend.py, its own thread): marked sent on PUBACK."""
        return self.link.publish(topics.telemetry(self.device), t.to_bytes(), qos=1, timeout_s=5)

    def _publish_ota_status(self, status: OtaStatus) -> None:
        self.link.publish(topics.ota_status(self.device), status.to_bytes(), qos=1, timeout_s=2)

    def _install(self, model: InstalledModel) -> None:
        self.classifier = self._classifier_for(model.path)
        self.report["adapter_version"] = model.adapter_version

    def _classifier_for(self, int8_path: Path) -> Classifier:
        """An adapter-merged model (int8 beside its merged fp32) on the configured backend."""
        from edge_daemon.inference.adapter import merged_fp32_path

        files = ModelFiles(merged_fp32_path(int8_path), int8_path, self.cfg.model.base_fp32)
        return make_classifier(self.cfg.model.backend, files, self.cfg.model.threads, merged=True)

    # -- work (main thread) --------------------------------------------------

    def _gate(self) -> Any:
        if self._vad is None:
            self._vad = SileroVad(threads=1)
        self._vad.reset()
        return make_gate(self.cfg.gate, self._vad)

    def _evaluate(self, phase: str) -> EvalResult | None:
        ev = self.cfg.evaluation
        if ev is None:
            return None
        result = evaluate(open_source(ev.source), self._gate(), self.classifier, ev.shifted_classes)
        self.report[f"eval_{phase}"] = asdict(result)
        log.info("%s: accuracy %.3f, shifted %.3f", phase, result.accuracy, result.shifted_accuracy)
        return result

    def _on_window(self, c: Classified, source: AudioSource) -> None:
        if c.score >= self.cfg.model.event_threshold:
            event = Event(
                self.device, int(time.time() * 1000), c.label, round(c.score, 4), c.model_sha256
            )
            self.link.publish(topics.events(self.device), event.to_bytes(), qos=0, timeout_s=0)
            self.report["events"] += 1
        feedback = source.feedback(c.index)
        reason = self._selector.decide(
            c.label, c.score, feedback, stream_s=c.start_s, pending_bytes=self.buffer.pending_bytes
        )
        if reason is None:
            return
        meta = batch.SampleMeta(
            sample_id=os.urandom(16).hex(),
            captured_at_ms=int(time.time() * 1000),
            stream_offset_s=c.start_s,
            predicted=c.label,
            score=min(1.0, max(0.0, c.score)),
            feedback=feedback,
            model_sha256=c.model_sha256,
            reason=reason,
        )
        self.buffer.add(meta, c.features.astype(np.float16))
        self.seal_batches(force=False)

    def seal_batches(self, force: bool) -> int:
        """Turn buffered samples into sealed, signed batches and send them."""
        n = 0
        size = self.cfg.uplink.batch_samples
        while True:
            pending = self.buffer.unbatched(size)
            if not pending or (len(pending) < size and not force):
                return n
            metas = tuple(m for m, _ in pending)
            feats = np.stack([f for _, f in pending])
            plain = batch.encode(batch.Batch(self.device, metas, feats))
            batch_id, seq, now_ms = (
                os.urandom(16).hex(),
                self.buffer.next_seq(),
                int(time.time() * 1000),
            )
            sealed = envelope.seal(
                plain,
                device=self.device,
                batch_id=batch_id,
                seq=seq,
                created_at_ms=now_ms,
                wrap_public_key_pem=self._unwrap_pem,
                kid_wrap=self._kid_wrap,
                kid_sig=self.keys.signing_key_id(),
                sign_digest=self.keys.sign_digest,
            )
            self.buffer.commit_batch(batch_id, seq, now_ms, sealed, [m.sample_id for m in metas])
            self._send(batch_id, sealed)
            n += 1

    def _send(self, batch_id: str, sealed: bytes) -> None:
        self._sent_at[batch_id] = time.monotonic()
        if self.link.publish(topics.upload(self.device), sealed, qos=1, timeout_s=10):
            self.report["uplink_bytes"] += len(sealed)

    def resend_unacked(self) -> None:
        now = time.monotonic()
        for p in self.buffer.unacked():
            if now - self._sent_at.get(p.batch_id, 0.0) >= self.cfg.uplink.retry_s:
                log.info("resending unacknowledged batch seq=%d", p.seq)
                self._send(p.batch_id, p.envelope)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            self._evaluate("before")
            source = open_capture(self.cfg.source, self.cfg.capture, stop)
            stats = run_stream(
                self.sensors.tap(source.blocks()),
                self._gate(),
                lambda: self.classifier,
                lambda c: self._on_window(c, source),
                source.truth(),
            )
            self.seal_batches(force=True)
            self.report["stream"] = {k: v for k, v in asdict(stats).items() if k != "kept_indices"}
            if isinstance(source, CaptureProcess):
                self.report["capture"] = asdict(source.stats())
            self.report["sensors"] = self.sensors.report()
            self.report["selection"] = dict(self._selector.stats)
            phase = "serving"
            self._write_report(phase)
            while not stop.is_set():
                try:
                    topic, payload = self._ota_queue.get(timeout=0.5)
                except queue.Empty:
                    self.resend_unacked()
                    if self._acked.is_set():
                        self._acked.clear()
                        self._write_report(phase)
                    continue
                before = self.report["adapter_version"]
                self.ota.handle(topic, payload)
                if self.report["adapter_version"] != before:
                    self._evaluate("after")
                    phase = "updated"
                    self._write_report(phase)
        finally:
            self.stop()

    def _write_report(self, phase: str) -> None:
        self.report["phase"] = phase
        self.report["buffer"] = self.buffer.counts()
        self.report["model_sha256"] = self.classifier.model_sha256
        write_atomic(
            self.cfg.state_dir / "report.json", json.dumps(self.report, indent=1).encode(), 0o644
        )


def _apply_adapter(base_fp32: Path, adapter: Path, out: Path) -> Path:
    from edge_daemon.inference.adapter import apply_adapter

    return apply_adapter(base_fp32, adapter, out)
