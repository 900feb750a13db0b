"""The sidecar's metric families (``sidecar_*``) and the trainer's progress file.

Owns ``SPECS`` (every family ``cloud-sidecar serve`` exports: names, units, labels;
documented in ``docs/metrics.md``), ``Metrics()`` (a fresh set of them) and
``TRAIN_SPECS`` (the oneshot trainer's families, ``sidecar_train_*``, which
``cloud_sidecar.train_metrics`` writes as a textfile for node_exporter).

Invariants: every ``inc``/``set`` names a family declared here (``KeyError`` otherwise);
label values are bounded sets (reasons, states, labels, device ids of enrolled devices),
never free text from a message.
"""

from __future__ import annotations

from fleet_protocol.io import metrics as m

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
    m.Spec(
        "loop_stalled",
        "gauge",
        "1 for a serve loop stalled (one item in hand for stall_s, or its thread gone).",
        ("loop",),
    ),
    m.Spec("up", "gauge", "1 while the sidecar serves."),
)

TRAIN_PHASES = ("dataset", "train", "gate", "registered")
TRAIN_SPECS = (
    m.Spec("train_phase", "gauge", "1 for the phase the current or last run is in.", ("phase",)),
    m.Spec(
        "train_progress_ratio", "gauge", "Share of the run's planned optimizer steps done (0 to 1)."
    ),
    m.Spec(
        "train_steps_total",
        "counter",
        "Optimizer steps done by the current or last run (a resumed run starts at its checkpoint).",
    ),
    m.Spec("train_steps_planned", "gauge", "Optimizer steps the run plans (epochs x batches)."),
    m.Spec("train_loss", "gauge", "Training loss at the last logged step (cross-entropy, nats)."),
    m.Spec("train_val_loss", "gauge", "Validation loss at the last logged step (nats)."),
    m.Spec("train_grad_norm", "gauge", "Global L2 norm of the adapter's gradients, last step."),
    m.Spec("train_learning_rate", "gauge", "Learning rate of the last step (one-cycle schedule)."),
    m.Spec(
        "train_step_seconds", "gauge", "Mean wall time of one optimizer step since the last log."
    ),
    m.Spec(
        "train_projected_cost",
        "gauge",
        "Extrapolated cost of the run (train.price_per_hour's currency).",
    ),
    m.Spec(
        "train_alerts_total", "counter", "Training alerts raised by the run, by kind.", ("kind",)
    ),
    m.Spec("train_gate_passed", "gauge", "1 when the last candidate passed the gate, else 0."),
    m.Spec("train_failed", "gauge", "1 when the last run ended in an error, else 0."),
    m.Spec("train_last_run_timestamp_seconds", "gauge", "Unix time of the last update."),
)


class Metrics(m.Metrics):
    """The families of ``cloud-sidecar serve``."""

    def __init__(self) -> None:
        super().__init__(PREFIX, SPECS)
