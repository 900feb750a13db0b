"""Composition root of the sidecar's ``serve`` command: ingest workers on the broker.

Start order: audit log → store → HSM session → MQTT link (shared ingest subscription
and the devices' OTA status). Stop in reverse. MQTT callbacks run ingest directly: it
is bounded work (one HSM decrypt, one SQLite transaction). When the HSM is unavailable
the upload is neither stored nor acknowledged; the session is reopened with backoff and
the device resends.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.errors import HsmError, HsmUnavailableError
from cloud_sidecar.ingest import Ingest
from cloud_sidecar.keys.hsm import Hsm
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink
from fleet_protocol.messages import OtaStatus

log = logging.getLogger(__name__)
OTA_STATUS_SUBSCRIPTION = f"{topics.PREFIX}/+/ota/status"


def open_hsm(cfg: SidecarConfig) -> Hsm:
    os.environ.update(cfg.hsm.env)  # the PKCS#11 module reads these when it loads
    return Hsm(str(cfg.hsm.module), cfg.hsm.token_label, cfg.hsm.pin())


def _ignore(_topic: str, _payload: bytes) -> None:
    return None


def open_link(
    cfg: SidecarConfig, client_id: str, on_message: Callable[[str, bytes], None] = _ignore
) -> MqttLink:
    b = cfg.broker
    return MqttLink(
        MqttEndpoint(b.host, b.port, b.ca_cert, b.client_cert, b.client_key),
        client_id=client_id,
        on_message=on_message,
    )


class SidecarApp:
    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self._hsm_lock = threading.Lock()

    def start(self) -> None:
        cfg = self.cfg
        self.audit = AuditLog(cfg.data_dir / "audit.jsonl", cfg.region)
        self.store = Store(cfg.data_dir / "store.sqlite3", cfg.region)
        self.hsm = open_hsm(cfg)
        self.link = open_link(cfg, f"cloud-sidecar-ingest-{os.getpid()}", self._on_message)
        self.ingest = Ingest(
            self.store,
            self.hsm,
            self.audit,
            self.metrics,
            self._publish,
            cfg.max_upload_bytes,
        )
        self.link.subscribe(topics.shared_upload_subscription(), 1)
        self.link.subscribe(OTA_STATUS_SUBSCRIPTION, 1)
        self.link.start(wait_s=15)
        self.audit.append("sidecar.started", "serve", pid=os.getpid())
        log.info("sidecar serving; store %s", self.store.counts())

    def _publish(self, topic: str, payload: bytes) -> None:
        # called from the MQTT network thread (ingest acks): queue, never wait there
        if not self.link.publish(topic, payload, qos=1, timeout_s=0):
            log.warning("could not publish to %s", topic)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/upload"):
            try:
                self.ingest.handle(topic, payload)
            except HsmUnavailableError:
                self._reopen_hsm()
        elif topic.endswith("/ota/status"):
            self._on_ota_status(topic, payload)

    def _on_ota_status(self, topic: str, payload: bytes) -> None:
        try:
            status = OtaStatus.from_bytes(payload)
        except ProtocolError as e:
            self.metrics.inc("ota_status_rejected_total", reason=e.reason)
            log.warning("malformed OTA status on %s: %s", topic, e)
            return
        self.metrics.inc("ota_status_total", state=status.state)
        self.audit.append(
            "ota.device_status",
            status.device,
            state=status.state,
            adapter_version=status.adapter_version,
            reason=status.reason,
        )

    def _reopen_hsm(self) -> None:
        with self._hsm_lock:
            for delay in (0.5, 1, 2, 4):
                try:
                    self.hsm.close()
                    self.hsm = open_hsm(self.cfg)
                    self.ingest.hsm = self.hsm
                    log.info("HSM session reopened")
                    return
                except HsmError as e:
                    log.warning("HSM still unavailable (%s); retrying in %.1f s", e, delay)
                    time.sleep(delay)

    def write_metrics(self, path: Path) -> None:
        write_atomic(path, self.metrics.render().encode(), 0o644)

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.start()
        if ready is not None:
            ready.set()
        try:
            while not stop.wait(2.0):
                self.write_metrics(self.cfg.data_dir / "metrics.prom")
        finally:
            self.write_metrics(self.cfg.data_dir / "metrics.prom")
            self.stop()

    def stop(self) -> None:
        for close in (self.link.stop, self.hsm.close, self.store.close):
            try:
                close()
            except Exception:
                log.exception("error while stopping")
