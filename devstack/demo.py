"""``make demo``: the whole loop on the embedded default, end to end, through every real part.

1. start the stack (CA, Mosquitto mTLS, SoftHSM token, one swtpm per device);
2. ``devstack write-dataset`` (the synthetic city as WAV files, one folder per class),
   then ``cloud-sidecar pretrain --dataset``: the base CNN, ONNX fp32 + int8;
3. provision devices (one-time enrollment claim, pinned cloud keys, base model); each
   device enrolls on first start: TPM identity key, CSR, short-lived certificate;
4. ``cloud-sidecar serve`` and one ``edge-daemon run`` per device, as separate processes;
5. when every device's batches are acknowledged: ``cloud-sidecar train`` (dataset,
   LoRA, gate, HSM signature, OTA publication);
6. when every device has applied the adapter: stop everything, write
   ``summary.json`` and print a table.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devstack.dataset import write_dataset
from devstack.errors import DevstackError
from devstack.provision import (
    FP32_FILE,
    INT8_FILE,
    _run,
    claim_device,
    cloud_config,
    device_config,
    export_cloud_keys,
)
from devstack.stack import DevStack

log = logging.getLogger(__name__)


def _reports(configs: list[Path]) -> list[dict[str, Any]]:
    out = []
    for cfg in configs:
        state = Path(json.loads(cfg.read_text())["state_dir"])
        try:
            out.append(json.loads((state / "report.json").read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def _wait(
    what: str, cond: Callable[[], bool], timeout: float, check_alive: Callable[[], None]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive()
        if cond():
            return
        time.sleep(1.0)
    raise DevstackError(f"timed out after {timeout:.0f} s waiting for {what}")


def _uploaded(r: dict[str, Any]) -> bool:
    b = r.get("buffer", {})
    return r.get("phase") in ("serving", "updated") and b.get("batches", 0) == b.get(
        "batches_acked", -1
    )


def run_demo(
    out: Path, n_devices: int = 3, stream_s: int = 480, eval_s: int = 180, timeout_s: float = 900
) -> dict[str, Any]:
    t0 = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    py = sys.executable
    with DevStack(work, n_devices=n_devices) as stack:
        print(f"[demo] stack up: broker :{stack.broker.port}, SoftHSM token, {n_devices} swtpm")
        base_dir, dataset = work / "base-model", work / "pretrain-dataset"
        ds = write_dataset(dataset)
        print(
            f"[demo] synthetic city written as a dataset ({ds.files} WAV clips);"
            " cloud-sidecar pretrain --dataset ..."
        )
        _run(
            [
                py,
                "-m",
                "cloud_sidecar",
                "pretrain",
                "--dataset",
                str(dataset),
                "--out",
                str(base_dir),
            ]
        )
        card = json.loads((base_dir / "model_card.json").read_text())
        cloud_keys = export_cloud_keys(stack, work / "cloud-keys")
        cloud_cfg = cloud_config(stack, work / "cloud" / "data", base_dir)
        configs = []
        for i, slot in enumerate(stack.devices):
            claim = claim_device(cloud_cfg, slot)  # `cloud-sidecar fleet claim`, one-time
            cfg = device_config(stack, slot, i, base_dir, cloud_keys, stream_s, eval_s, claim)
            configs.append(cfg)
        print(
            f"[demo] claims issued for {', '.join(d.device_id for d in stack.devices)};"
            " each enrolls on first start (TPM identity, CSR, short-lived certificate)"
        )
        sidecar = stack.procs.start(
            "cloud-sidecar", [py, "-m", "cloud_sidecar", "serve", "--config", str(cloud_cfg)]
        )
        edges = [
            stack.procs.start(
                f"edge-{s.device_id}", [py, "-m", "edge_daemon", "run", "--config", str(c)]
            )
            for s, c in zip(stack.devices, configs, strict=True)
        ]

        def alive() -> None:
            for child in [sidecar, *edges]:
                if not child.alive():
                    raise DevstackError(f"{child.name} exited:\n{child.log_tail()}")

        print(
            "[demo] devices stream scenes through gate → int8 model → buffer → sealed uploads ..."
        )
        _wait(
            "all uploads acknowledged",
            lambda: all(_uploaded(r) for r in _reports(configs)),
            timeout_s,
            alive,
        )
        print("[demo] cloud-sidecar train (dataset → LoRA → gate → HSM signature → OTA) ...")
        _run([py, "-m", "cloud_sidecar", "train", "--config", str(cloud_cfg), "--publish"])
        run = json.loads((work / "cloud" / "data" / "runs" / "latest.json").read_text())
        _wait(
            "every device to apply the adapter",
            lambda: all(r.get("phase") == "updated" for r in _reports(configs)),
            timeout_s,
            alive,
        )
        reports = _reports(configs)
        for child in edges:
            stack.procs.stop(child)
        stack.procs.stop(sidecar)
    summary = summarize(reports, run, card, base_dir, work, time.monotonic() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary, reports)
    return summary


def _weighted(reports: list[dict[str, Any]], phase: str, key: str, n_key: str) -> float:
    num = sum(r[phase][key] * r[phase][n_key] for r in reports if phase in r)
    den = sum(r[phase][n_key] for r in reports if phase in r)
    return round(num / den, 4) if den else 0.0


def summarize(
    reports: list[dict[str, Any]],
    run: dict[str, Any],
    card: dict[str, Any],
    base_dir: Path,
    work: Path,
    wall: float,
) -> dict[str, Any]:
    stream = [r.get("stream", {}) for r in reports]
    before = [r.get("eval_before", {}) for r in reports]
    return {
        "accuracy_before": _weighted(reports, "eval_before", "shifted_accuracy", "n_shifted"),
        "accuracy_after": _weighted(reports, "eval_after", "shifted_accuracy", "n_shifted"),
        "overall_accuracy_before": _weighted(reports, "eval_before", "accuracy", "n_windows"),
        "overall_accuracy_after": _weighted(reports, "eval_after", "accuracy", "n_windows"),
        "speech_frames_in": sum(s.get("speech_frames_in", 0) for s in stream)
        + sum(b.get("speech_frames_in", 0) for b in before),
        "speech_frames_leaked": sum(s.get("speech_frames_leaked", 0) for s in stream)
        + sum(b.get("speech_frames_leaked", 0) for b in before),
        "uplink_bytes": sum(r.get("uplink_bytes", 0) for r in reports),
        "raw_audio_bytes": sum(s.get("raw_audio_bytes", 0) for s in stream),
        "adapter_bytes": run["edge_adapter_bytes"],
        "adapter_peft_bytes": run["adapter_peft_bytes"],
        "base_model_bytes": (base_dir / INT8_FILE).stat().st_size,
        "base_model_fp32_bytes": (base_dir / FP32_FILE).stat().st_size,
        "devices_updated": sum(1 for r in reports if r.get("adapter_version", 0) >= 1),
        "devices": len(reports),
        "gate": run["gate"],
        "wall_seconds": round(wall, 1),
        "adapter_dir": str(Path(run["adapter_dir"]).resolve()),
        "ota_repo_dir": str(Path(run["ota_repo_dir"]).resolve()),
        "audit_log": str((work / "cloud" / "data" / "audit.jsonl").resolve()),
        "base_model_sha256": card["sha256"][FP32_FILE],
        "pretrain_dataset_manifest_sha256": card["dataset"]["manifest_sha256"],
    }


def print_table(s: dict[str, Any], reports: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'device':<10}{'shifted acc before':>20}{'after':>8}{'overall before':>16}{'after':>8}{'uplink B':>11}"
    )
    for r in reports:
        b, a = r.get("eval_before", {}), r.get("eval_after", {})
        print(
            f"{r.get('device_id', '?'):<10}{b.get('shifted_accuracy', 0):>20.3f}{a.get('shifted_accuracy', 0):>8.3f}"
            f"{b.get('accuracy', 0):>16.3f}{a.get('accuracy', 0):>8.3f}{r.get('uplink_bytes', 0):>11}"
        )
    leak = s["speech_frames_leaked"] / max(1, s["speech_frames_in"])
    print()
    print(f"accuracy on shifted classes: {s['accuracy_before']:.3f} → {s['accuracy_after']:.3f}")
    print(
        f"speech frames leaked: {s['speech_frames_leaked']} of {s['speech_frames_in']} ({leak:.4%})"
    )
    print(
        f"uplink {s['uplink_bytes']} B vs raw audio {s['raw_audio_bytes']} B ({s['uplink_bytes'] / max(1, s['raw_audio_bytes']):.4f})"
    )
    print(
        f"adapter {s['adapter_bytes']} B vs base model {s['base_model_bytes']} B; devices updated {s['devices_updated']}/{s['devices']}"
    )
    print(
        f"wall {s['wall_seconds']} s; adapter (PEFT) {s['adapter_dir']}; OTA repo {s['ota_repo_dir']}"
    )
