"""Composition root of the edge daemon: builds components in order, stops them in reverse.

Start order: TPM key store → replay buffer (needs the sealed storage key) → classifier
(the installed adapter model if there is one, else the base, on the configured backend)
→ MQTT link (enrolling first when the device has no certificate) → certificate renewer
→ OTA client → outbox → sensors (and the resend of telemetry an outage held back) →
listener (capture and inference, in its own thread). Then ``run`` starts the service
side (``supervise.Supervision``: control socket, metrics, READY, watchdog) and
``service.serve`` runs the main loop until the stop event; ``stop`` undoes everything
in reverse.

The audio source is the configured one (a microphone, a file) unless one is handed in:
devstack's simulated city and the tests' endless sources reach the daemon that way,
through the same ``AudioSource`` protocol a microphone implements. MQTT callbacks only
enqueue work (the mailbox) or touch thread-safe state (acks, renewal).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.capture import AudioSource, CaptureProcess, open_capture
from edge_daemon.config import DeviceConfig
from edge_daemon.enroll import device_endpoint, make_renewer
from edge_daemon.health import daemon_stages
from edge_daemon.inference.adapter import apply_adapter, merged_fp32_path
from edge_daemon.inference.backends import Classifier, ModelFiles, make_classifier
from edge_daemon.keys.tpm import TpmKeyStore
from edge_daemon.listen import Keeper, Listener, ModelSlot
from edge_daemon.metrics import EdgeMetrics
from edge_daemon.ota import InstalledModel, OtaClient
from edge_daemon.pipeline import make_gate
from edge_daemon.privacy.vad import SileroVad
from edge_daemon.selection import Selector
from edge_daemon.sensors.runtime import DeviceSensors
from edge_daemon.service import LoopStats, Mailbox, serve
from edge_daemon.supervise import Supervision, version
from edge_daemon.uplink import Outbox
from fleet_protocol import ota, topics
from fleet_protocol.io.files import file_sha256, write_atomic
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.messages import OtaState, OtaStatus
from fleet_protocol.telemetry import Telemetry

if TYPE_CHECKING:  # python-tuf is imported only when ota.tuf_root is set
    from edge_daemon.ota_compose import TufParts

log = logging.getLogger(__name__)


class EdgeApp:
    def __init__(self, cfg: DeviceConfig, source: AudioSource | None = None) -> None:
        self.cfg = cfg
        self.device = cfg.device_id
        self._given_source = source
        self.mailbox = Mailbox()
        self.faults = LoopFaults()  # every thread's caught exceptions, in the status report
        self._stop = threading.Event()
        self.metrics = EdgeMetrics(self.device, version())
        self.loop = LoopStats()
        self.ota_state = ""

    # -- lifecycle -----------------------------------------------------------

    def start(self, stop: threading.Event | None = None) -> None:
        cfg = self.cfg
        self._stop = stop if stop is not None else self._stop
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.keys = TpmKeyStore(cfg.tpm.tcti, cfg.state_dir / "keys")
        storage_key = self.keys.storage_key()  # TPM-sealed: the buffer's and OTA state's keys
        self.buffer = ReplayBuffer(
            cfg.state_dir / "buffer.sqlite3",
            storage_key,
            cfg.selection.max_buffer_bytes,
        )
        self.base_sha256 = file_sha256(cfg.model.base_fp32)
        self.link = MqttLink(
            device_endpoint(cfg, self.keys),  # enrolls first when there is no certificate
            client_id=self.device,
            on_message=self._on_message,
            faults=self.faults,
            on_request=self._on_request,
        )
        self.renewer = make_renewer(cfg, self.keys, self.link, self.faults)
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
            apply_adapter=apply_adapter,
        )
        installed = self.ota.installed()
        self.tuf: TufParts | None = None
        if cfg.ota.tuf_root is not None:  # TUF over MQTT chunks, two slots (docs/adr/0016)
            from edge_daemon.ota_compose import compose_tuf

            self.tuf = compose_tuf(
                cfg,
                storage_key=storage_key,
                base_sha256=self.base_sha256,
                publish_request=lambda t, p, rt, c: self.link.publish(
                    t, p, qos=1, timeout_s=5, response_topic=rt, correlation=c
                ),
                report=self._report_tuf,
                load_model=lambda path: (
                    self._classifier_for(path) if path else self._base_classifier()
                ),
                running=self._running_model,
                swap=self._swap_tuf,
                connected=lambda: self.link.connected,
            )
            self.model = ModelSlot(self.tuf.recover(), observe=self.metrics.observe_inference)
            self.model_path = self.tuf.model_path()
            self.adapter_version = self.tuf.adapter_version()
        else:
            self.model = ModelSlot(
                self._classifier_for(installed.path)
                if installed is not None
                else self._base_classifier(),
                observe=self.metrics.observe_inference,
            )
            self.model_path = installed.path if installed is not None else cfg.model.base_int8
            self.adapter_version = installed.adapter_version if installed is not None else 0
        self.outbox = Outbox(
            device=self.device,
            buffer=self.buffer,
            signer=self.keys,
            unwrap_public_key_pem=cfg.cloud.unwrap_public_key.read_bytes(),
            publish=lambda t, p: self.link.publish(t, p, qos=1, timeout_s=10),
            cfg=cfg.uplink,
            ack_public_key_pem=(
                cfg.cloud.ack_public_key.read_bytes() if cfg.cloud.ack_public_key else None
            ),
        )
        self.link.subscribe(topics.ack(self.device), 1)
        if self.tuf is None:
            self.link.subscribe(self.ota.metadata_topic, 1)
        else:  # one update path only: the single-key document is not even received
            self.link.subscribe(self.tuf.timestamp_topic, 1)
            self.link.subscribe(self.tuf.requester.response_topic, 1)
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
            faults=self.faults,
        )
        self.sensors.start()
        self.source = (
            self._given_source
            if self._given_source is not None
            else open_capture(cfg.source, cfg.capture, self._stop)
        )
        self.selector = Selector(
            cfg.selection, np.random.default_rng(int.from_bytes(os.urandom(8), "big"))
        )
        self.keeper = Keeper(
            device=self.device,
            source=self.source,
            selector=self.selector,
            buffer=self.buffer,
            event_threshold=cfg.model.event_threshold,
            publish=lambda t, p: self.link.publish(t, p, qos=0, timeout_s=0),
        )
        self.listener = Listener(
            source=self.source,
            gate=make_gate(cfg.gate, SileroVad(threads=1)),
            model=self.model,
            on_window=self.keeper,
            tap=self.sensors.tap,
            stop=self._stop,
        )
        self.listener.start()
        if self.tuf is not None:
            self.tuf.worker.start(self._stop)
            self.tuf.worker.nudge()
        log.info(
            "edge daemon %s listening (model %s)", self.device, self.model.get().model_sha256[:12]
        )

    def run(self, stop: threading.Event) -> None:
        self.start(stop)
        service = None
        try:
            service = Supervision(
                self.cfg,
                stages=daemon_stages(self.listener, lambda: self.loop.ticks),
                status=self.status,
                metrics=self.metrics,
            )
            service.start()
            serve(
                stop=stop,
                listener=self.listener,
                outbox=self.outbox,
                mailbox=self.mailbox,
                handle=self.ota.handle,
                report=self.write_report,
                faults=self.faults,
                on_tick=service.tick,
                stats=self.loop,
            )
        finally:
            if service is not None:
                service.close()
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._renew_stop.set()
        if self.renewer is not None:
            self.renewer.join()
        if hasattr(self, "listener"):
            self.listener.join(timeout=10)
        if getattr(self, "tuf", None) is not None:
            assert self.tuf is not None
            self.tuf.worker.join(timeout=10)
            self.tuf.clock.checkpoint()
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
            self.outbox.on_ack(payload)
        elif self.tuf is not None and topic == self.tuf.timestamp_topic:
            self.tuf.worker.nudge()  # the update thread fetches; never this thread
        else:
            self.mailbox.put(topic, payload)

    def _on_request(
        self, topic: str, payload: bytes, response_topic: str | None, corr: bytes | None
    ) -> None:
        if self.tuf is not None and topic == self.tuf.requester.response_topic:
            self.tuf.requester.deliver(topic, payload, response_topic, corr)
        else:
            self._on_message(topic, payload)

    def _publish_telemetry(self, t: Telemetry) -> bool:
        return self.link.publish(topics.telemetry(self.device), t.to_bytes(), qos=0, timeout_s=0)

    def _republish_telemetry(self, t: Telemetry) -> bool:
        """Held-back telemetry (sensors/resend.py, its own thread): marked sent on PUBACK."""
        return self.link.publish(topics.telemetry(self.device), t.to_bytes(), qos=1, timeout_s=5)

    def _publish_ota_status(self, status: OtaStatus) -> None:
        self.ota_state = status.state
        self.link.publish(topics.ota_status(self.device), status.to_bytes(), qos=1, timeout_s=2)

    # -- models (main loop) --------------------------------------------------

    def _install(self, model: InstalledModel) -> None:
        """An update was verified and merged: run it from the next audio block on."""
        self.model.swap(self._classifier_for(model.path))
        self.model_path = model.path
        self.adapter_version = model.adapter_version

    def _running_model(self) -> Any:
        return self.model.get()

    def _swap_tuf(self, classifier: Classifier) -> None:
        """The slot manager switched (update thread): run it from the next block on."""
        self.model.swap(classifier)
        if self.tuf is not None:
            self.model_path = self.tuf.model_path() or self.cfg.model.base_int8
            self.adapter_version = self.tuf.adapter_version()

    def _report_tuf(self, state: OtaState, version: int, reason: str) -> None:
        model = getattr(self, "model", None)
        self._publish_ota_status(
            OtaStatus(
                device=self.device,
                metadata_version=0,
                adapter_version=version,
                state=state,
                reason=reason[:64],
                model_sha256=model.get().model_sha256 if model is not None else "",
            )
        )

    def _base_classifier(self) -> Classifier:
        files = ModelFiles(self.cfg.model.base_fp32, self.cfg.model.base_int8)
        return make_classifier(self.cfg.model.backend, files, self.cfg.model.threads)

    def _classifier_for(self, int8_path: Path) -> Classifier:
        """An adapter-merged model (int8 beside its merged fp32) on the configured backend."""
        files = ModelFiles(merged_fp32_path(int8_path), int8_path, self.cfg.model.base_fp32)
        return make_classifier(self.cfg.model.backend, files, self.cfg.model.threads, merged=True)

    # -- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        listener = self.listener
        state = "listening" if listener.alive else ("ended" if listener.ended else "failed")
        out: dict[str, Any] = {
            "device_id": self.device,
            "state": state,
            "model": {
                "sha256": self.model.get().model_sha256,
                "path": str(self.model_path),
                "adapter_version": self.adapter_version,
            },
            "stream": asdict(listener.stats),
            "events": self.keeper.events,
            "inferences": dict(self.keeper.by_label),
            "selection": dict(self.selector.stats),
            "buffer": self.buffer.counts(),
            "buffer_pending_bytes": self.buffer.pending_bytes(),
            "buffer_refused_write": self.keeper.refused_write,
            "uplink": asdict(self.outbox.stats),
            "sensors": self.sensors.report(),
            "mailbox_dropped": self.mailbox.dropped,
            "loop_errors": self.faults.counts(),
            "ota": {"state": self.ota_state, "channel": self.cfg.ota.channel},
        }
        if isinstance(self.source, CaptureProcess):
            out["capture"] = asdict(self.source.stats())
        return out

    def write_report(self) -> None:
        write_atomic(
            self.cfg.state_dir / "report.json", json.dumps(self.status(), indent=1).encode(), 0o644
        )
