"""The sidecar's metric families (``sidecar_*``) and the trainer's progress file.

Owns ``SPECS`` (every family ``cloud-sidecar serve`` exports: names, units, labels;
documented in ``docs/metrics.md``), ``Metrics()`` (a fresh set of them) and
``TrainProgress`` (the oneshot trainer's families, ``sidecar_train_*``, written after
each step to ``data_dir/metrics/train.prom`` for node_exporter's textfile collector,
since a oneshot has no endpoint to scrape).

Invariants: every ``inc``/``set`` names a family declared here (``KeyError`` otherwise);
label values are bounded sets (reasons, states, labels, device ids of enrolled devices),
never free text from a message.
"""

from __future__ import annotations

import time
from pathlib import Path

from fleet_protocol.io import metrics as m
from fleet_protocol.io.files import write_atomic

PREFIX = "sidecar"

SPECS = (
    m.Spec("ingest_batches_total", "counter", "Upload batches stored, by device.", ("device",)),
    m.Spec("ingest_samples_total", "counter", "Samples stored, by device.", ("device",)),
    m.Spec("ingest_duplicates_total", "counter", "Uploads already stored (re-acked)."),
    m.Spec(
        "ingest_residual_speech_total",
        "counter",
        "Windows the residual speech scan kept out of the store at ingest, by device.",
        ("device",),
    ),
    m.Spec(
        "ingest_rejected_total", "counter", "Uploads refused, by reason (audited).", ("reason",)
    ),
    m.Spec("ingest_hsm_unavailable_total", "counter", "Uploads left unacked: HSM unavailable."),
    m.Spec("hsm_unwraps_total", "counter", "Batch-key unwraps in the HSM, by result.", ("result",)),
    m.Spec("hsm_reopened_total", "counter", "HSM sessions reopened after an outage."),
    m.Spec("audit_checkpoint_failed_total", "counter", "Audit checkpoints the HSM did not sign."),
    m.Spec("ota_status_total", "counter", "OTA outcomes reported by devices.", ("state",)),
    m.Spec(
        "rollout_devices",
        "gauge",
        "Devices by their last reported OTA outcome and adapter version.",
        ("adapter_version", "state"),
    ),
    m.Spec("events_total", "counter", "Sound events received.", ("device", "label")),
    m.Spec("telemetry_messages_total", "counter", "Telemetry messages received.", ("device",)),
    m.Spec("telemetry_readings_total", "counter", "Telemetry readings received.", ("device",)),
    m.Spec(
        "message_rejected_total",
        "counter",
        "Device messages refused, by topic kind and reason.",
        ("kind", "reason"),
    ),
    m.Spec(
        "message_rejected_unaudited_total",
        "counter",
        "Refusals past the per-device audit budget (counted, not audited).",
        ("kind",),
    ),
    m.Spec("labels_imported_total", "counter", "Label records imported.", ("source", "via")),
    m.Spec("labels_rejected_total", "counter", "Label messages refused, by reason.", ("reason",)),
    m.Spec("fleet_enrolled_total", "counter", "Devices enrolled with a claim."),
    m.Spec("fleet_renewed_total", "counter", "Device certificates renewed."),
    m.Spec("fleet_revoked_total", "counter", "Devices revoked."),
    m.Spec("fleet_challenged_total", "counter", "TPM credential-activation challenges sent."),
    m.Spec("fleet_activated_total", "counter", "Challenges answered by the device's TPM."),
    m.Spec("fleet_reenrolled_total", "counter", "Devices re-enrolled by their registered key."),
    m.Spec(
        "fleet_rejected_total",
        "counter",
        "Enrollment, activation or renewal requests refused, by operation and reason.",
        ("op", "reason"),
    ),
    m.Spec(
        "fleet_clock_skewed_total",
        "counter",
        "Enrollment, activation or renewal requests more than max_clock_skew_s off this clock"
        " (served; ADR 0017), by operation.",
        ("op",),
    ),
    m.Spec("hsm_pin_refused_total", "counter", "HSM logins refused for the PIN (no retry)."),
    m.Spec(
        "ingest_deferred_total",
        "counter",
        "Uploads answered 'retry later' (device resends), by reason.",
        ("reason",),
    ),
    m.Spec(
        "loop_errors_total",
        "counter",
        "Exceptions a service loop caught and survived, by exception type and loop.",
        ("kind", "loop"),
    ),
    m.Spec(
        "device_certificate_expiry_timestamp_seconds",
        "gauge",
        "Unix time the device's newest certificate (issued since start) expires.",
        ("device",),
    ),
    m.Spec("up", "gauge", "1 while the sidecar serves."),
)

TRAIN_STEPS = ("dataset", "train", "gate", "signed", "published")
TRAIN_SPECS = (
    m.Spec("train_progress_ratio", "gauge", "Share of the run's steps done (0 to 1)."),
    m.Spec("train_step", "gauge", "1 for the step the last run reached.", ("step",)),
    m.Spec("train_loss", "gauge", "Final training loss of the last run (cross-entropy)."),
    m.Spec("train_gate_passed", "gauge", "1 when the last candidate passed the gate, else 0."),
    m.Spec("train_failed", "gauge", "1 when the last run ended in an error, else 0."),
    m.Spec("train_last_run_timestamp_seconds", "gauge", "Unix time of the last update."),
)


class Metrics(m.Metrics):
    """The families of ``cloud-sidecar serve``."""

    def __init__(self) -> None:
        super().__init__(PREFIX, SPECS)


class TrainProgress:
    """The trainer's families, rewritten atomically after every step."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "metrics" / "train.prom"
        self.metrics = m.Metrics(PREFIX, TRAIN_SPECS)
        self.metrics.set("train_failed", 0)

    def step(self, step: str, **gauges: float) -> None:
        self.metrics.clear("train_step")
        self.metrics.set("train_step", 1, step=step)
        self.metrics.set("train_progress_ratio", (TRAIN_STEPS.index(step) + 1) / len(TRAIN_STEPS))
        for name, value in gauges.items():
            self.metrics.set(name, value)
        self._write()

    def failed(self) -> None:
        self.metrics.set("train_failed", 1)
        self._write()

    def _write(self) -> None:
        self.metrics.set("train_last_run_timestamp_seconds", time.time())
        write_atomic(self.path, self.metrics.render().encode(), 0o644)
