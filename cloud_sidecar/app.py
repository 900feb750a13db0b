"""Composition root of the sidecar's ``serve`` command: ingest workers on the broker.

Start order: audit log → store → HSM session → MQTT link (shared subscriptions: uploads
for ingest; the devices' OTA status, events and telemetry for
``cloud_sidecar.device_messages``; label batches from downstream systems for
``cloud_sidecar.labels``; with a ``fleet`` section also enrollment and renewal,
answered by ``cloud_sidecar.fleet`` on its own thread (a bounded queue: enrollment signs
in the HSM and never holds up ingest on the MQTT thread)). Stop in reverse. Every topic and subscription
comes from ``fleet_protocol.topics``, the names the broker's ACL is generated from
(``fleet_protocol.acl``). MQTT callbacks run ingest directly: it is bounded work (one
HSM decrypt, one SQLite transaction). When the HSM is unavailable
the upload is neither stored nor acknowledged; a background thread reopens the session
with backoff (never the MQTT thread), and the device resends. Any token failure during
an unwrap other than "this ciphertext is not for this key" counts as unavailable: a
retry loses nothing, a rejection would make the device drop the batch.

No thread dies of input: the MQTT handler, the HSM reopen loop and the metrics and
checkpoint loop catch every ``Exception``, count it (``loop_errors_total{loop,kind}``,
``fleet_protocol.io.guard``), log it and go on.

Under systemd (``Type=notify``) ``run`` sends READY once every part above is up, a
STATUS line, and a WATCHDOG ping every turn of its loop (``fleet_protocol.io.sdnotify``)
only while no loop stalled (``cloud_sidecar.health``): the MQTT thread (ingest, labels,
device messages, OTA chunks), the fleet worker and the HSM reopen loop each hold a
``Beat``; one work item in hand for ``stall_s`` (or the fleet worker's thread gone)
withholds the pings, says ``STATUS=STALLED: …`` and sets ``loop_stalled{loop}``, and
``WatchdogSec=`` lets systemd restart the sidecar. The main loop's own work (metrics
file, checkpoints, timestamp refresh, rollout steps) runs on the pinging thread.
With a ``metrics`` section it serves ``GET /metrics`` (``cloud_sidecar.metrics``).

The audit chain head is signed by the HSM (``AuditLog.checkpoint``) at start, every
``audit_checkpoint_s`` and at stop; a failed checkpoint is logged and counted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.connect import open_hsm, open_link
from cloud_sidecar.device_messages import DeviceMessages
from cloud_sidecar.errors import HsmDecryptError, HsmError, HsmPinError, HsmUnavailableError
from cloud_sidecar.fleet import FleetService, open_fleet
from cloud_sidecar.health import Beat, LoopMonitor
from cloud_sidecar.ingest import Ingest
from cloud_sidecar.keys.hsm import ACK_LABEL
from cloud_sidecar.labels import LabelService
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.ota_publish import (
    open_repository,
    publish_metadata,
    rollout_command,
    tuf_available,
    tuf_repo_dir,
)
from cloud_sidecar.ota_serve import ChunkServer
from cloud_sidecar.residual_scan import load_scanner
from cloud_sidecar.store_api import open_store
from fleet_protocol import topics
from fleet_protocol.io.files import write_atomic
from fleet_protocol.io.guard import BoundedWorker, LoopFaults
from fleet_protocol.io.metrics import MetricsServer
from fleet_protocol.io.sdnotify import Notifier

log = logging.getLogger(__name__)


class _HsmUnwrapper:
    """Ingest's view of the app's current HSM session (unwrap keys, ack key); token
    failures become "unavailable"."""

    def __init__(self, app: SidecarApp) -> None:
        self._app = app

    def unwrap_key_ids(self) -> tuple[str, ...]:
        try:
            return self._app.hsm.unwrap_key_ids()
        except HsmUnavailableError:
            raise
        except HsmError as e:
            raise HsmUnavailableError(f"HSM cannot name its unwrap keys: {e}") from e

    def decrypt_oaep(self, wrapped: bytes, key_id: str) -> bytes:
        try:
            return self._app.hsm.decrypt_oaep(wrapped, key_id)
        except (HsmDecryptError, HsmUnavailableError):
            raise
        except HsmError as e:  # e.g. the key's handle vanished with the token
            raise HsmUnavailableError(f"HSM failed during unwrap: {e}") from e

    def ack_key_id(self) -> str:
        try:
            return self._app.hsm.ack_key_id()
        except HsmUnavailableError:
            raise
        except HsmError as e:
            raise HsmUnavailableError(f"HSM cannot name its ack key: {e}") from e

    def sign_ack_digest(self, digest: bytes) -> bytes:
        try:
            return self._app.hsm.sign_digest_with(ACK_LABEL, digest)
        except HsmUnavailableError:
            raise
        except HsmError as e:
            raise HsmUnavailableError(f"HSM cannot sign an ack: {e}") from e


class SidecarApp:
    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.faults = LoopFaults(  # every loop's caught exceptions: loop_errors_total
            lambda loop, kind: self.metrics.inc("loop_errors_total", loop=loop, kind=kind)
        )
        self._hsm_lock = threading.Lock()
        self._reopening = False
        self._stopping = threading.Event()
        self.health = LoopMonitor(cfg.stall_s)
        self._mqtt_beat = self.health.watch(Beat("mqtt"))
        self._hsm_beat = self.health.watch(Beat("hsm_reopen"))

    def start(self) -> None:
        cfg = self.cfg
        cfg.check_residency()  # also for configs built in code, not only load_config
        self.audit = cfg.open_audit()
        self.store = open_store(cfg, self.audit)
        self.hsm = open_hsm(cfg)
        self.link = open_link(
            cfg,
            f"cloud-sidecar-ingest-{os.getpid()}",
            self._mqtt_beat.wrap(self._on_message),
            self.faults,
            on_request=self._mqtt_beat.wrap(self._on_request),
        )
        self.chunks = ChunkServer(tuf_repo_dir(cfg), self._publish_response)
        keys = _HsmUnwrapper(self)
        self.ingest = Ingest(
            self.store,
            keys,
            self.audit,
            self.metrics,
            self._publish,
            cfg.max_upload_bytes,
            signer=keys,
            scanner=load_scanner(cfg.data.speech_scanner) if cfg.data.speech_scanner else None,
        )
        self.labels = LabelService(self.store, self.audit, self.metrics)
        self.device_messages = DeviceMessages(self.store, self.audit, self.metrics)
        self.link.subscribe(topics.shared_upload_subscription(), 1)
        self.link.subscribe(topics.labels_subscription(), 1)
        self.link.subscribe(topics.shared(topics.ota_status(topics.ANY)), 1)
        self.link.subscribe(topics.shared(topics.events(topics.ANY)), 1)
        self.link.subscribe(topics.shared(topics.telemetry(topics.ANY)), 1)
        self.link.subscribe(topics.shared(topics.ota_request(topics.ANY)), 1)
        self.fleet: FleetService | None = None
        if cfg.fleet is not None:  # enrollment and renewal (cloud_sidecar/fleet.py)
            self.fleet = open_fleet(cfg, self.store, self.audit, self.metrics)
            # enrollment signs in the HSM: its own thread, never the ingest (MQTT) thread
            beat = Beat("fleet")
            worker = BoundedWorker("fleet", beat.wrap(self._handle_fleet), self.faults)
            self.health.watch(beat, lambda: worker.alive)
            self._fleet_worker = worker
            worker.start()
            self.link.subscribe(topics.enroll_subscription(), 1)
            self.link.subscribe(topics.renew_subscription(), 1)
        self.link.start(wait_s=15)
        self.audit.append("sidecar.started", "serve", pid=os.getpid())
        self.checkpoint_audit()
        log.info("sidecar serving; store %s", self.store.counts())

    def _publish(self, topic: str, payload: bytes) -> None:
        # called from the MQTT network thread (ingest acks): queue, never wait there
        if not self.link.publish(topic, payload, qos=1, timeout_s=0):
            log.warning("could not publish to %s", topic)

    def _publish_response(self, topic: str, payload: bytes, correlation: bytes | None) -> bool:
        # MQTT 5 response (OTA chunks), from the network thread: queue, never wait there
        return self.link.publish(topic, payload, qos=1, timeout_s=0, correlation=correlation)

    def _on_request(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None:
        if topics.kind_of(topic) == topics.OTA_REQUEST:
            self.chunks.handle(topic, payload, response_topic, correlation)
        else:  # properties on an ordinary message change nothing
            self._on_message(topic, payload)

    def _on_message(self, topic: str, payload: bytes) -> None:
        kind = topics.kind_of(topic)
        if kind == topics.UPLOAD:
            try:
                self.ingest.handle(topic, payload)
            except HsmUnavailableError:
                self._hsm_failed()
        elif kind in (topics.OTA_STATUS, topics.EVENTS, topics.TELEMETRY):
            self.device_messages.handle(topic, payload)
        elif topics.is_labels_topic(topic):
            reply = self.labels.handle(topic, payload)
            if reply is not None:
                self._publish(*reply)
        elif self.fleet is not None and (
            kind == topics.CERT_REQUEST or topics.is_enroll_topic(topic)
        ):
            if not self._fleet_worker.offer(topic, payload):
                self.metrics.inc("fleet_rejected_total", op="queue", reason="queue_full")
        else:
            log.debug("ignored a message on %s", topic[:120])

    def _handle_fleet(self, topic: str, payload: bytes) -> None:
        assert self.fleet is not None
        reply = self.fleet.handle(topic, payload)
        if reply is not None:
            self._publish(*reply)

    def _hsm_failed(self) -> None:
        """Start one background reopen loop, unless one is running."""
        with self._hsm_lock:
            if self._reopening or self._stopping.is_set():
                return
            self._reopening = True
        threading.Thread(target=self._reopen_hsm, name="hsm-reopen", daemon=True).start()

    def _reopen_hsm(self) -> None:
        delay = 0.5
        try:
            while not self._stopping.is_set():
                with self.faults.guard("hsm_reopen"):
                    self.hsm.close()  # later calls on it raise HsmUnavailableError: no ack
                try:
                    with self._hsm_beat.working():
                        hsm = open_hsm(self.cfg)
                except HsmPinError as e:  # retrying would lock the token: stop and say so
                    self.metrics.inc("hsm_pin_refused_total")
                    log.critical("HSM refused the PIN; not retrying (fix it, restart): %s", e)
                    with self.faults.guard("hsm_reopen"):
                        self.audit.append("hsm.pin_refused", "serve", detail=str(e)[:300])
                    return
                except Exception as e:  # HsmError, or whatever a PKCS#11 module raises
                    log.warning("HSM still unavailable (%s); retrying in %.1f s", e, delay)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                try:
                    with self._hsm_beat.working():
                        hsm.unwrap_key_id()  # the token answers and holds the key
                except Exception as e:
                    hsm.close()
                    log.warning("HSM reopened but unusable (%s); retrying in %.1f s", e, delay)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                self.hsm = hsm
                self.metrics.inc("hsm_reopened_total")
                log.info("HSM session reopened")
                return
        finally:
            with self._hsm_lock:
                self._reopening = False

    def checkpoint_audit(self) -> None:
        """Sign the audit chain head in the HSM; on failure log, count and go on."""
        try:
            self.audit.checkpoint(self.hsm.sign_digest, self.hsm.signing_key_id())
        except HsmError as e:
            self.metrics.inc("audit_checkpoint_failed_total")
            log.warning("audit checkpoint not signed: %s", e)

    def write_metrics(self, path: Path) -> None:
        write_atomic(path, self.metrics.render().encode(), 0o644)

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.start()
        notifier = Notifier()
        server = None
        if self.cfg.metrics is not None:
            server = MetricsServer(self.metrics, self.cfg.metrics.host, self.cfg.metrics.port)
            self.metrics_port = server.start().port
        self.metrics.set("up", 1)
        notifier.ready(f"serving; store {self.store.counts()}")
        if ready is not None:
            ready.set()
        last_checkpoint = last_timestamp = last_rollout = time.monotonic()
        stalled: dict[str, str] = {}
        try:
            while not stop.wait(2.0):
                stalled = self._check_loops(notifier, stalled)
                if not stalled:
                    notifier.watchdog()
                with self.faults.guard("metrics"):  # a full disk must not stop serving
                    self.write_metrics(self.cfg.data_dir / "metrics.prom")
                if time.monotonic() - last_checkpoint >= self.cfg.audit_checkpoint_s:
                    with self.faults.guard("checkpoint"):
                        self.checkpoint_audit()
                    last_checkpoint = time.monotonic()
                if time.monotonic() - last_timestamp >= self.cfg.ota.timestamp_refresh_s:
                    self.refresh_ota_timestamp()
                    last_timestamp = time.monotonic()
                if time.monotonic() - last_rollout >= self.cfg.ota.rollout_step_s:
                    self.step_rollout()
                    last_rollout = time.monotonic()
        finally:
            notifier.stopping()
            self.metrics.set("up", 0)
            self.write_metrics(self.cfg.data_dir / "metrics.prom")
            if server is not None:
                server.close()
            notifier.close()
            self.stop()

    def _check_loops(self, notifier: Notifier, before: dict[str, str]) -> dict[str, str]:
        """The stalled loops now; say so (log, STATUS, metrics) when that changed."""
        stalled = self.health.stalled()
        for beat in self.health.beats:
            self.metrics.set("loop_stalled", 1 if beat.name in stalled else 0, loop=beat.name)
        if stalled.keys() != before.keys():
            if stalled:
                text = "; ".join(f"{name}: {why}" for name, why in stalled.items())
                log.error("loop stalled, withholding the watchdog: %s", text)
                notifier.status(f"STALLED: {text}")
            else:
                log.warning("every loop makes progress again; watchdog resumed")
                notifier.status(f"serving; store {self.store.counts()}")
        return stalled

    def refresh_ota_timestamp(self) -> None:
        """Re-sign and republish the TUF timestamp well before it expires (ADR 0016)."""
        if not (tuf_available() and (tuf_repo_dir(self.cfg) / "metadata" / "1.root.json").exists()):
            return
        try:
            repo = open_repository(self.cfg, self.hsm)  # its flock orders it with train/CLI
            version = repo.refresh_timestamp()
            self.audit.append("ota.timestamp", f"timestamp-v{version}", version=version)
            self._publish_ota()
        except Exception:  # the next round tries again; devices keep the old one until expiry
            log.exception("could not refresh the OTA timestamp")

    def _publish_ota(self) -> None:
        """The repository's metadata, retained, as the OTA publisher: serve's own identity
        may not write the OTA tree (ADR 0018), so this is a connection of its own."""
        if not publish_metadata(self.cfg, f"cloud-sidecar-ota-{os.getpid()}"):
            log.warning("the broker did not take every OTA metadata message")

    def step_rollout(self) -> str:
        """Widen, finish or abort a running rollout as the devices' reports say (ADR 0016)."""
        path = self.cfg.data_dir / "rollout.json"
        if not (tuf_available() and path.exists()):
            return ""
        try:
            if json.loads(path.read_bytes()).get("state") != "running":
                return ""
            before = path.read_bytes()
            out = rollout_command(self.cfg, "step", None, None)
            if path.read_bytes() != before:  # the repository changed: republish
                self._publish_ota()
            return out
        except Exception:  # the next round tries again
            log.exception("rollout step failed")
            return ""

    def stop(self) -> None:
        self._stopping.set()
        # the final checkpoint signs the head after the last ingest
        worker = getattr(self, "_fleet_worker", None)
        stops = (self.link.stop, *([worker.stop] if worker else []), self.checkpoint_audit)
        for close in (*stops, self.hsm.close, self.store.close):
            try:
                close()
            except Exception:
                log.exception("error while stopping")
