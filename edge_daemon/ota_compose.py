"""Builds the TUF update path for the daemon (called by ``app.py`` when ``ota.tuf_root`` is set).

The OTA state files on the card (floor, clock, failure ledger) are sealed under a key
derived from ``storage_key``, the TPM-sealed key the replay buffer also uses
(``ota_state.derive_state_key``).

Owns nothing at run time; it wires: ``MqttRequester`` (MQTT 5 request/response) →
``ChunkFetcher`` (python-tuf's network seam) → ``TufUpdateClient`` (python-tuf + device
policy, ``TrustedClock``) → ``TufUpdateWorker`` (its own thread) → ``SlotManager`` (two
slots, health window) → the daemon's ``ModelSlot`` through ``ObservedClassifier``.

The shadow check runs the candidate on the golden clips signed with the adapter
(``fleet_model.golden``: windows with their expected labels, picked by the training run
and signed into the bundle and the TUF targets) and refuses it when an output is not
finite or not in [0, 1] or when its top-1 accuracy on them is below the signed
``golden_min_percent`` (``golden_accuracy``). A target without golden clips (an older
bundle) is checked on the calibration windows beside the base model instead: it must
agree with the running model on at least half of them (top-1).

python-tuf is imported here, lazily from ``app.py``'s point of view: a daemon without
``ota.tuf_root`` never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edge_daemon.config import DeviceConfig
from edge_daemon.errors import ConfigError
from edge_daemon.inference.adapter import apply_adapter
from edge_daemon.inference.backends import Classifier
from edge_daemon.ota_clock import TrustedClock
from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger
from edge_daemon.ota_link import MqttRequester, PublishRequest
from edge_daemon.ota_slots import GoldenClips, HealthPolicy, SlotManager
from edge_daemon.ota_state import derive_state_key
from edge_daemon.ota_tuf import TufUpdateClient
from edge_daemon.ota_update import ObservedClassifier, TufUpdateWorker
from fleet_model import ADAPTER_FORMAT, calibration_path
from fleet_model.errors import GoldenError
from fleet_model.golden import MAX_GOLDEN_BYTES, golden_accuracy, parse_golden
from fleet_model.int8 import MAX_CALIBRATION_BYTES
from fleet_protocol import topics
from fleet_protocol.messages import OtaState
from fleet_protocol.ota_transfer import TransferLimits

log = logging.getLogger(__name__)

SHADOW_WINDOWS = 64
MODEL_FILE = "adapter.int8.onnx"


@dataclass
class TufParts:
    worker: TufUpdateWorker
    slots: SlotManager[Classifier]
    requester: MqttRequester
    clock: TrustedClock
    timestamp_topic: str

    def recover(self) -> ObservedClassifier:
        return ObservedClassifier(self.slots.recover(), self.slots.observe)

    def model_path(self) -> Path | None:
        return self.slots.model_path(self.slots.record.active)

    def adapter_version(self) -> int:
        a = self.slots.record.active
        return a.adapter_version if a else 0


def compose_tuf(
    cfg: DeviceConfig,
    *,
    storage_key: bytes,
    base_sha256: str,
    publish_request: PublishRequest,
    report: Callable[[OtaState, int, str], None],
    load_model: Callable[[Path | None], Classifier],
    running: Callable[[], Any],
    swap: Callable[[Any], None],
    connected: Callable[[], bool] = lambda: True,
) -> TufParts:
    if cfg.ota.tuf_root is None:
        raise ConfigError("ota.tuf_root is not set")
    limits = TransferLimits(
        max_file=cfg.ota.max_artifact_bytes, request_timeout_s=cfg.ota.request_timeout_s
    )
    requester = MqttRequester(cfg.device_id, publish_request, cfg.ota.request_timeout_s)
    state_key = derive_state_key(storage_key)  # MACs floor, clock and ledger (ota_state)
    clock = TrustedClock(
        cfg.state_dir / "ota" / "clock.json",
        state_key=state_key,
        timestamp_lifetime=timedelta(hours=cfg.ota.timestamp_lifetime_h),
    )
    client = TufUpdateClient(
        cfg.state_dir,
        ChunkFetcher(requester, cfg.state_dir, limits),
        device_id=cfg.device_id,
        base_sha256=base_sha256,
        adapter_format=ADAPTER_FORMAT,
        clock=clock,
        state_key=state_key,
    )
    client.bootstrap(cfg.ota.tuf_root.read_bytes())
    calib = _calibration(cfg.model.base_fp32)
    slots: SlotManager[Classifier]

    def build(adapter: Path, out_dir: Path) -> Path:
        return apply_adapter(cfg.model.base_fp32, adapter, out_dir / MODEL_FILE)

    def check(candidate: Any, golden: GoldenClips | None) -> str:
        if golden is not None:
            return golden_check(candidate, golden)
        return shadow_check(candidate, running(), calib)

    slots = SlotManager(
        cfg.state_dir,
        build=build,
        load=load_model,
        shadow_check=check,
        swap=lambda c: swap(ObservedClassifier(c, slots.observe)),
        report=report,
        policy=HealthPolicy(min_windows=cfg.ota.health_windows),
    )
    ledger = FailureLedger(cfg.state_dir / "ota" / "failures.json", limits, state_key=state_key)

    def announce(stop: Any) -> None:
        """Once the link is up, say the state recovered at boot (it was not sendable then)."""
        while not connected() and not stop.wait(0.5):
            pass
        slots.report_current()

    worker = TufUpdateWorker(
        client, slots, ledger, report, poll_s=cfg.ota.poll_s, on_start=announce
    )
    timestamp_topic = topics.ota_tuf_metadata(cfg.ota.channel, "timestamp.json")
    return TufParts(worker, slots, requester, clock, timestamp_topic)


def _calibration(base_fp32: Path) -> np.ndarray[Any, Any] | None:
    path = calibration_path(base_fp32)
    try:
        if path.stat().st_size > MAX_CALIBRATION_BYTES:
            return None
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("no calibration windows for the shadow check (%s)", e)
        return None
    return np.asarray(data[:SHADOW_WINDOWS], dtype=np.float32)


def golden_check(candidate: Any, golden: GoldenClips) -> str:
    """ "" when ``candidate`` reaches the signed accuracy on the golden clips; else the reason."""
    try:
        with open(golden.path, "rb") as f:
            x, y = parse_golden(f.read(MAX_GOLDEN_BYTES + 1))
    except (OSError, GoldenError) as e:
        log.warning("golden clips unusable: %s", e)
        return "golden_malformed"
    try:
        probs = np.asarray(candidate.predict(x))
    except Exception as e:
        log.warning("shadow inference on the golden clips failed: %s", e)
        return "shadow_inference"
    if probs.ndim != 2 or probs.shape[0] != len(y) or not np.all(np.isfinite(probs)):
        return "shadow_output"
    if np.any(probs < 0.0) or np.any(probs > 1.0):
        return "shadow_output"
    if int(y.max()) >= probs.shape[1]:
        return "golden_malformed"  # a label this model has no class for
    accuracy = golden_accuracy(probs, y)
    log.info("golden clips: accuracy %.3f (at least %.3f)", accuracy, golden.min_accuracy)
    return "" if accuracy >= golden.min_accuracy else "golden_accuracy"


def shadow_check(candidate: Any, current: Any, windows: np.ndarray[Any, Any] | None) -> str:
    """ "" when ``candidate`` may replace ``current``; else the reason."""
    if windows is None or len(windows) == 0:
        return ""
    try:
        new = candidate.predict(windows)
        old = current.predict(windows)
    except Exception as e:
        log.warning("shadow inference failed: %s", e)
        return "shadow_inference"
    if new.shape != old.shape or not np.all(np.isfinite(new)):
        return "shadow_output"
    if np.any(new < 0.0) or np.any(new > 1.0):
        return "shadow_output"
    agreement = float(np.mean(new.argmax(axis=1) == old.argmax(axis=1)))
    return "" if agreement >= 0.5 else "shadow_disagreement"
