"""The edge daemon's metric families (``edge_*``) and how they are read from its status.

Owns ``SPECS`` (names, units and labels, documented in ``docs/metrics.md``) and
``EdgeMetrics``: the families, fed two ways. The listener thread observes each classifier
call's duration (``inference_latency_seconds``) through ``observe_inference``;
everything the components already count (``inferences_total`` by label too) is copied from the
daemon's status report (``update``) on each main-loop report, so no component learns
about Prometheus.

Invariants: counters copied from a component only go up (a component's counters never
reset while the daemon runs); every family carries the device id as a label, so a
fleet-wide Prometheus can sum or pick devices; label values are bounded (class labels,
stage and state names).
"""

from __future__ import annotations

from typing import Any

from fleet_protocol.io import metrics as m

PREFIX = "edge"

D = ("device",)
SPECS = (
    m.Spec(
        "info",
        "gauge",
        "1, with the running version and model as labels.",
        (*D, "version", "model_sha256", "adapter_version"),
    ),
    m.Spec("up", "gauge", "1 while every pipeline stage makes progress, else 0.", D),
    m.Spec("stage_stalled", "gauge", "1 for a stage without progress past stall_s.", (*D, "stage")),
    m.Spec("audio_blocks_total", "counter", "Audio blocks captured.", D),
    m.Spec("audio_bytes_total", "counter", "Bytes of 16-bit PCM captured (never stored).", D),
    m.Spec("capture_frames_total", "counter", "Frames from the capture process.", D),
    m.Spec(
        "capture_frames_dropped_total",
        "counter",
        "Frames dropped for a lagging consumer or lost in a capture crash.",
        D,
    ),
    m.Spec("capture_restarts_total", "counter", "Capture processes restarted.", D),
    m.Spec("gate_windows_total", "counter", "1 s windows judged by the privacy gate.", D),
    m.Spec(
        "gate_windows_removed_total",
        "counter",
        "Windows removed by the gate for speech (with margins).",
        D,
    ),
    m.Spec(
        "gate_residual_speech_total",
        "counter",
        "Windows the VAD passed and the second speech check removed (residual speech).",
        D,
    ),
    m.Spec("inferences_total", "counter", "Windows classified, by predicted label.", (*D, "label")),
    m.Spec(
        "inference_latency_seconds",
        "histogram",
        "Time of one classifier call (the model, on its backend).",
        D,
    ),
    m.Spec("events_total", "counter", "Events published (score at or above the threshold).", D),
    m.Spec("buffer_bytes", "gauge", "Replay-buffer bytes not yet acknowledged by the cloud.", D),
    m.Spec("buffer_samples", "gauge", "Samples in the replay buffer.", D),
    m.Spec("uploads_pending", "gauge", "Sealed batches not yet acknowledged.", D),
    m.Spec("uploads_acknowledged_total", "counter", "Batch acknowledgements received.", D),
    m.Spec("uploads_sent_total", "counter", "Batch sends, first sends and resends.", D),
    m.Spec("uplink_bytes_total", "counter", "Envelope bytes sent.", D),
    m.Spec("ota_state", "gauge", "1 for the outcome of the last update attempt.", (*D, "state")),
    m.Spec("ota_adapter_version", "gauge", "Adapter version running (0: the base model).", D),
    m.Spec("mailbox_dropped_total", "counter", "Network messages dropped by a full mailbox.", D),
    m.Spec(
        "loop_errors_total",
        "counter",
        "Exceptions the daemon's loops caught and survived (all loops).",
        D,
    ),
)


class EdgeMetrics:
    def __init__(self, device: str, version: str) -> None:
        self.device = device
        self.version = version
        self.metrics = m.Metrics(PREFIX, SPECS)

    def observe_inference(self, seconds: float) -> None:
        """From the listener thread: the duration of one classifier call."""
        self.metrics.observe("inference_latency_seconds", seconds, device=self.device)

    def health(self, stalled: list[str], stages: list[str]) -> None:
        d = self.device
        self.metrics.set("up", 0 if stalled else 1, device=d)
        for stage in stages:
            self.metrics.set("stage_stalled", int(stage in stalled), device=d, stage=stage)

    def update(self, status: dict[str, Any]) -> None:
        """Copy the counters and gauges of ``EdgeApp.status()``."""
        d, mm = self.device, self.metrics
        model = status["model"]
        mm.clear("info")
        mm.set(
            "info",
            1,
            device=d,
            version=self.version,
            model_sha256=str(model["sha256"])[:12],
            adapter_version=str(model["adapter_version"]),
        )
        stream = status["stream"]
        mm.set_total("audio_blocks_total", stream["blocks"], device=d)
        mm.set_total("audio_bytes_total", stream["raw_audio_bytes"], device=d)
        mm.set_total("gate_windows_total", stream["windows_in"], device=d)
        removed = stream["windows_in"] - stream["windows_kept"]
        mm.set_total("gate_windows_removed_total", max(0, removed), device=d)
        mm.set_total("events_total", status["events"], device=d)
        residual = stream.get("windows_residual_speech", 0)
        mm.set_total("gate_residual_speech_total", residual, device=d)
        for label, n in status.get("inferences", {}).items():
            mm.set_total("inferences_total", n, device=d, label=label)
        capture = status.get("capture")
        if capture is not None:
            mm.set_total("capture_frames_total", capture["frames"], device=d)
            dropped = max(capture["frames_dropped"], capture["frames_lost"])
            mm.set_total("capture_frames_dropped_total", dropped, device=d)
            mm.set_total("capture_restarts_total", capture["restarts"], device=d)
        buffer = status["buffer"]
        mm.set("buffer_bytes", status.get("buffer_pending_bytes", 0), device=d)
        mm.set("buffer_samples", buffer.get("samples", 0), device=d)
        batches = buffer.get("batches", 0) - buffer.get("batches_acked", 0)
        mm.set("uploads_pending", max(0, batches), device=d)
        uplink = status["uplink"]
        mm.set_total("uploads_acknowledged_total", uplink["acks"], device=d)
        mm.set_total("uploads_sent_total", uplink["sends"] + uplink["resends"], device=d)
        mm.set_total("uplink_bytes_total", uplink["uplink_bytes"], device=d)
        ota = status.get("ota") or {}
        if ota.get("state"):
            mm.clear("ota_state")
            mm.set("ota_state", 1, device=d, state=str(ota["state"]))
        mm.set("ota_adapter_version", model["adapter_version"], device=d)
        mm.set_total("mailbox_dropped_total", status["mailbox_dropped"], device=d)
        errors = status.get("loop_errors", 0)  # {"loop/kind": n} (fleet_protocol.io.guard)
        total = sum(errors.values()) if isinstance(errors, dict) else int(errors)
        mm.set_total("loop_errors_total", total, device=d)
