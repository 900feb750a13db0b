"""``make demo``: the whole loop on the embedded default, end to end, through every real part.

1. start the stack (CA, Mosquitto mTLS, SoftHSM token, one swtpm per device);
2. ``devstack write-dataset`` (the synthetic city as WAV files, one folder per class),
   then ``cloud-sidecar pretrain --dataset``: the base CNN, ONNX fp32 + int8;
3. the simulated city renders each device's street (a scene with the device's own
   two-tone siren, speech mixed in) as a recording the device replays through its
   ``file`` source with real capture times; provisioning leaves a one-time enrollment
   claim, the pinned cloud keys and the base model on each device; each enrolls on
   first start (TPM identity key, CSR, short-lived certificate);
4. ``cloud-sidecar serve`` and one ``edge-daemon run`` per device, as separate processes;
5. the city's downstream system sends what it knows (labels by device and time range)
   over the label channel, with its own certificate, like any incident system;
6. when every device's batches are acknowledged: ``cloud-sidecar train`` (dataset from
   labelled samples, LoRA, gate, HSM signature, OTA publication);
7. when every device runs the adapter: stop everything, score the base and the
   adapter each device runs on held-out scenes (devstack knows their truth; devices
   do not), write ``summary.json`` and print a table.
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

import numpy as np

from cloud_sidecar.store import Store
from devstack.city import Truth, city_labels, write_stream
from devstack.dataset import write_dataset
from devstack.errors import DevstackError
from devstack.evaluate import (
    EvalResult,
    device_classifier,
    evaluate,
    leakage,
    uploaded_speech_frames,
)
from devstack.labeler import send_labels
from devstack.provision import (
    FP32_FILE,
    INT8_FILE,
    _run,
    claim_device,
    cloud_config,
    device_config,
    export_cloud_keys,
    tuf_root,
)
from devstack.report import write_report
from devstack.scene.stream import SceneSpec, render_scene
from devstack.stack import DevStack
from edge_daemon.config import DeviceConfig, load_config

log = logging.getLogger(__name__)
HILO_BY_DEVICE = ((435.0, 580.0), (450.0, 600.0), (392.0, 523.0), (466.0, 622.0), (415.0, 554.0))
CITY_SOURCE = "city-incidents"  # the simulated city's downstream label source
LABEL_COVERAGE = 0.8  # share of the city's event runs it reports
# The demo packs a device's days into minutes of audio: no daily uplink cap, and a larger
# representative (audit) sample than the 3 % default so a few minutes already teach.
DEMO_SELECTION = {"uplink_bytes_per_day": None, "audit_fraction": 0.25}


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
    return r.get("state") == "ended" and b.get("batches", 0) == b.get("batches_acked", -1)


def _scene(i: int, seed: int, duration_s: int) -> SceneSpec:
    hilo = HILO_BY_DEVICE[i % len(HILO_BY_DEVICE)]
    return SceneSpec(
        seed=seed, duration_s=duration_s, siren_pattern="hilo", hilo_hz=hilo, speech_rate=0.1
    )


def run_demo(
    out: Path, n_devices: int = 3, stream_s: int = 480, eval_s: int = 180, timeout_s: float = 900
) -> dict[str, Any]:
    t0 = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    py = sys.executable
    with DevStack(work, n_devices=n_devices, label_sources=(CITY_SOURCE,)) as stack:
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
        root = tuf_root(cloud_cfg, work / "cloud-keys")  # None without python-tuf (ADR 0016)
        configs: list[Path] = []
        truths: list[Truth] = []
        started_ms = int(time.time() * 1000)
        for i, slot in enumerate(stack.devices):
            # the street recorded over the last stream_s seconds, replayed by the device
            start_ms = started_ms - stream_s * 1000
            wav = work / "streets" / f"{slot.device_id}.wav"
            truths.append(write_stream(_scene(i, 1000 + i, stream_s), wav, start_ms))
            claim = claim_device(cloud_cfg, slot)  # `cloud-sidecar fleet claim`, one-time
            source = {"type": "file", "path": str(wav), "start_time_ms": start_ms}
            configs.append(
                device_config(
                    stack, slot, base_dir, cloud_keys, source, claim, DEMO_SELECTION, root
                )
            )
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

        print("[demo] devices replay their streets: gate → int8 model → buffer → sealed uploads")
        _wait("every device to enroll", lambda: all(_reports(configs)), timeout_s, alive)
        records = [
            r
            for i, (slot, truth) in enumerate(zip(stack.devices, truths, strict=True))
            for r in city_labels(slot.device_id, truth, coverage=LABEL_COVERAGE, seed=77 + i)
        ]
        results = send_labels(
            stack.endpoint(stack.label_source_certs[CITY_SOURCE]), CITY_SOURCE, records
        )
        refused = [r for r in results if r.status != "accepted"]
        if refused:
            raise DevstackError(f"the sidecar refused the city's labels: {refused[0].errors[:3]}")
        print(
            f"[demo] the city's incident system sent {len(records)} labels over the label channel"
        )
        _wait(
            "all uploads acknowledged",
            lambda: all(_uploaded(r) for r in _reports(configs)),
            timeout_s,
            alive,
        )
        print("[demo] cloud-sidecar train (dataset → LoRA → gate → signed bundle) ...")
        _run([py, "-m", "cloud_sidecar", "train", "--config", str(cloud_cfg)])
        run = json.loads((work / "cloud" / "data" / "runs" / "latest.json").read_text())
        release = [py, "-m", "cloud_sidecar", "release", "--config", str(cloud_cfg)]
        print(f"[demo] cloud-sidecar release approve {run['version']}, then publish (OTA) ...")
        _run([*release, "approve", run["version"], "--approver", "devstack-demo"])
        _run([*release, "publish", run["version"]])
        tuf_dir = work / "cloud" / "data" / "ota-tuf"  # ota_publish.tuf_repo_dir
        run["ota_export_dir"] = _export_tuf(py, cloud_cfg, out / "ota-repo", tuf_dir)
        _wait(
            "every device to apply the adapter",
            lambda: all(r["model"]["adapter_version"] >= 1 for r in _reports(configs)),
            timeout_s,
            alive,
        )
        reports = _reports(configs)
        for child in edges:
            stack.procs.stop(child)
        stack.procs.stop(sidecar)
    print("[demo] scoring base and adapted models on held-out streets (devstack's truth) ...")
    scores = _score(configs, reports, eval_s)
    stored = _stored_capture_times(work / "cloud" / "data" / "store.sqlite3")
    leaks = [_leakage(c, t) for c, t in zip(configs, truths, strict=True)]
    uploaded = sum(
        uploaded_speech_frames(t, stored.get(r["device_id"], []))
        for r, t in zip(reports, truths, strict=True)
    )
    summary = summarize(reports, scores, leaks, uploaded, len(records), run, card, base_dir, work)
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary, reports, scores)
    devices = [
        {
            "device": r.get("device_id", "?"),
            "shifted_before": sc["before"].shifted_accuracy,
            "shifted_after": sc["after"].shifted_accuracy,
            "overall_before": sc["before"].accuracy,
            "overall_after": sc["after"].accuracy,
        }
        for r, sc in zip(reports, scores, strict=True)
    ]
    metrics_path = work / "cloud" / "data" / "runs" / run["run_id"] / "metrics.jsonl"
    metrics = (
        [json.loads(x) for x in metrics_path.read_text().splitlines()]
        if metrics_path.exists()
        else []
    )
    print(
        f"[demo] report: {write_report(out / 'report.html', summary, devices, run['gate'], metrics)}"
    )
    return summary


def _score(
    configs: list[Path], reports: list[dict[str, Any]], eval_s: int
) -> list[dict[str, EvalResult]]:
    """Each device's base and installed model on a held-out street of its own."""
    out = []
    for i, (path, report) in enumerate(zip(configs, reports, strict=True)):
        cfg = load_config(path)
        scene = render_scene(_scene(i, 5000 + i, eval_s))
        truth = Truth(0, scene.window_labels, scene.speech_frames)
        out.append(
            {
                phase: evaluate(scene.audio, truth, cfg.gate, device_classifier(cfg, model))
                for phase, model in (
                    ("before", cfg.model.base_int8),
                    ("after", Path(report["model"]["path"])),
                )
            }
        )
    return out


def _leakage(config: Path, truth: Truth) -> tuple[int, int]:
    import soundfile as sf

    cfg: DeviceConfig = load_config(config)
    audio, _ = sf.read(str(cfg.source.path), dtype="float32")  # type: ignore[union-attr]
    return leakage(
        np.asarray(audio, np.float32), truth, cfg.gate, device_classifier(cfg, cfg.model.base_int8)
    )


def _stored_capture_times(db: Path) -> dict[str, list[int]]:
    store = Store(db, "eu-central-1")
    try:
        return store.capture_times()
    finally:
        store.close()


def _weighted(scores: list[dict[str, EvalResult]], phase: str, shifted: bool) -> float:
    pairs = [
        (s[phase].shifted_accuracy, s[phase].n_shifted)
        if shifted
        else (s[phase].accuracy, s[phase].n_windows)
        for s in scores
    ]
    den = sum(n for _, n in pairs)
    return round(sum(a * n for a, n in pairs) / den, 4) if den else 0.0


def _export_tuf(py: str, cloud_cfg: Path, dest: Path, tuf_dir: Path) -> str:
    """``cloud-sidecar ota export``: the signed repository in the standard TUF layout.

    Empty when the sidecar published no TUF repository (python-tuf not installed).
    """
    if not tuf_dir.is_dir():
        print("[demo] no TUF repository (python-tuf not installed); ota_repo_dir is the legacy one")
        return ""
    _run([py, "-m", "cloud_sidecar", "ota", "--config", str(cloud_cfg), "export", str(dest)])
    return str(dest)


def summarize(
    reports: list[dict[str, Any]],
    scores: list[dict[str, EvalResult]],
    leaks: list[tuple[int, int]],
    uploaded_speech: int,
    labels_sent: int,
    run: dict[str, Any],
    card: dict[str, Any],
    base_dir: Path,
    work: Path,
) -> dict[str, Any]:
    return {
        "accuracy_before": _weighted(scores, "before", True),
        "accuracy_after": _weighted(scores, "after", True),
        "overall_accuracy_before": _weighted(scores, "before", False),
        "overall_accuracy_after": _weighted(scores, "after", False),
        "speech_frames_in": sum(n for n, _ in leaks),
        "speech_frames_leaked": sum(k for _, k in leaks),
        "speech_frames_uploaded": uploaded_speech,
        "labels_sent": labels_sent,
        "uplink_bytes": sum(r.get("uplink", {}).get("uplink_bytes", 0) for r in reports),
        "raw_audio_bytes": sum(r.get("stream", {}).get("raw_audio_bytes", 0) for r in reports),
        "adapter_bytes": run["edge_adapter_bytes"],
        "adapter_peft_bytes": run["adapter_peft_bytes"],
        "base_model_bytes": (base_dir / INT8_FILE).stat().st_size,
        "base_model_fp32_bytes": (base_dir / FP32_FILE).stat().st_size,
        "devices_updated": sum(1 for r in reports if r["model"]["adapter_version"] >= 1),
        "devices": len(reports),
        "gate": run["gate"],
        "adapter_dir": str(Path(run["adapter_dir"]).resolve()),
        "ota_repo_dir": str(Path(run.get("ota_export_dir") or run["ota_repo_dir"]).resolve()),
        "audit_log": str((work / "cloud" / "data" / "audit.jsonl").resolve()),
        "base_model_dir": str(base_dir.resolve()),
        "base_model_sha256": card["sha256"][FP32_FILE],
        "pretrain_dataset_manifest_sha256": card["dataset"]["manifest_sha256"],
    }


def print_table(
    s: dict[str, Any], reports: list[dict[str, Any]], scores: list[dict[str, EvalResult]]
) -> None:
    print()
    print(
        f"{'device':<10}{'shifted acc before':>20}{'after':>8}{'overall before':>16}{'after':>8}{'uplink B':>11}"
    )
    for r, sc in zip(reports, scores, strict=True):
        b, a = sc["before"], sc["after"]
        print(
            f"{r.get('device_id', '?'):<10}{b.shifted_accuracy:>20.3f}{a.shifted_accuracy:>8.3f}"
            f"{b.accuracy:>16.3f}{a.accuracy:>8.3f}{r.get('uplink', {}).get('uplink_bytes', 0):>11}"
        )
    leak = s["speech_frames_leaked"] / max(1, s["speech_frames_in"])
    print()
    print(f"accuracy on shifted classes: {s['accuracy_before']:.3f} → {s['accuracy_after']:.3f}")
    print(
        f"speech frames leaked: {s['speech_frames_leaked']} of {s['speech_frames_in']} ({leak:.4%});"
        f" in uploaded windows: {s['speech_frames_uploaded']}"
    )
    print(
        f"uplink {s['uplink_bytes']} B vs raw audio {s['raw_audio_bytes']} B ({s['uplink_bytes'] / max(1, s['raw_audio_bytes']):.4f})"
    )
    print(
        f"adapter {s['adapter_bytes']} B vs base model {s['base_model_bytes']} B; devices updated {s['devices_updated']}/{s['devices']}"
    )
    print(f"adapter (PEFT) {s['adapter_dir']}; OTA repo {s['ota_repo_dir']}")
