"""Edge benchmarks: real-time factor and peak RSS of the device path, and int8 vs fp32.

- ``run_pipeline``: runs ``benchmarks.edge_child`` as a subprocess pinned to one core.
  ``edge.rtf_one_core`` = CPU seconds of the streaming loop / audio seconds: the child is
  single-threaded and pinned, so this is what the loop costs a core; the wall-clock
  ratio (``edge.rtf_wall_one_core``) also counts the time other processes held that core
  on this shared machine. Start-up and model loading are reported apart, not in the
  ratio. ``edge.peak_rss_mb`` is the child's
  ``VmHWM`` from ``/proc/self/status``, read by the child as it ends: ``ru_maxrss``
  (``os.wait4``, ``RUSAGE_CHILDREN``) is no good here, because Linux carries the
  high-water mark across fork+exec, so the child would inherit this parent's (torch
  is loaded here for pretraining: ~400 MiB).
- ``compare_models``: the fp32 and the int8 base model on the same windows (those the
  gate released in the pipeline run), one thread, pinned to one core. Latency is per
  window at batch 1, each call timed on its own; fp32 and int8 alternate in rounds so
  that slow drifts in load hit both alike, and each latency is the median over every
  call of every round, so that a call preempted by another process (this box has 2
  shared cores) is an outlier rather than part of a round's mean: for the same two
  files under load the ratio of round means moved between 0.50 and 0.72, this one
  stayed within 0.509-0.520 (docs/adr/0012-static-int8.md). Macro-F1 is against the
  scene's ground-truth labels over the classes present.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PipelineRun:
    audio_s: float
    process_s: float  # wall-clock seconds of the streaming loop
    cpu_s: float  # CPU seconds the process used in that loop (one thread, one core)
    setup_s: float
    windows_in: int
    windows_kept: int
    samples_stored: int
    peak_rss_mb: float
    torch_imported: bool
    windows: Path
    vad_cpu_s: float = 0.0  # the VAD's own CPU seconds inside cpu_s (gate.stats.vad_cpu_s)
    check_cpu_s: float = 0.0  # the speech check's (features + model) inside cpu_s
    condition_cpu_s: float = 0.0  # conditioning the VAD's views (denoise STFT, AGC)  # npz: index, label, score, features


def pick_core() -> int:
    """The last core this process may use (core 0 tends to take interrupts)."""
    return max(os.sched_getaffinity(0))


def run_pipeline(wav: Path, model_int8: Path, work: Path) -> PipelineRun:
    work.mkdir(parents=True, exist_ok=True)
    state = work / "state"
    if state.exists():
        for f in state.iterdir():
            f.unlink()
    state.mkdir(exist_ok=True)
    out, windows = work / "pipeline.json", work / "windows.npz"
    cmd = [
        sys.executable, "-m", "benchmarks.edge_child", "--cpu", str(pick_core()),
        "--wav", str(wav), "--model", str(model_int8), "--state", str(state),
        "--out", str(out), "--windows", str(windows),
    ]  # fmt: skip
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"edge pipeline child failed with exit code {rc}")
    r = json.loads(out.read_text())
    return PipelineRun(
        audio_s=float(r["audio_s"]),
        process_s=float(r["process_s"]),
        cpu_s=float(r["cpu_s"]),
        setup_s=float(r["setup_s"]) + float(r["import_s"]),
        windows_in=int(r["windows_in"]),
        windows_kept=int(r["windows_kept"]),
        samples_stored=int(r["samples_stored"]),
        peak_rss_mb=int(r["vm_hwm_kib"]) / 1024.0,
        torch_imported=bool(r["torch_imported"]),
        windows=windows,
        vad_cpu_s=float(r.get("vad_cpu_s", 0.0)),
        check_cpu_s=float(r.get("check_cpu_s", 0.0)),
        condition_cpu_s=float(r.get("condition_cpu_s", 0.0)),
    )


def macro_f1(truth: list[str], predicted: list[str]) -> float:
    """Unweighted mean F1 over the classes present in ``truth`` or ``predicted``."""
    classes = sorted(set(truth) | set(predicted))
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(scores)) if scores else 0.0


def _per_window_s(clf: object, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Seconds of each ``predict`` call over ``x`` at batch 1."""
    predict = clf.predict  # type: ignore[attr-defined]
    out = np.empty(len(x), dtype=np.float64)
    for i in range(len(x)):
        t0 = time.perf_counter()
        predict(x[i : i + 1])
        out[i] = time.perf_counter() - t0
    return out


def compare_models(
    model_fp32: Path,
    model_int8: Path,
    windows: Path,
    window_labels: tuple[str, ...],
    latency_windows: int = 300,
    rounds: int = 5,
) -> dict[str, float]:
    from edge_daemon.inference.onnx_backend import OnnxClassifier
    from fleet_protocol.labels import CLASSES

    data = np.load(windows)
    x = data["features"].astype(np.float32)
    truth = [window_labels[int(i)] for i in data["index"]]
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {pick_core()})
    try:
        fp32, int8 = OnnxClassifier(model_fp32, 1), OnnxClassifier(model_int8, 1)
        preds = {
            name: [CLASSES[int(k)] for k in clf.predict(x).argmax(axis=1)]
            for name, clf in (("fp32", fp32), ("int8", int8))
        }
        sample = x[:latency_windows]
        _per_window_s(fp32, sample[:20]), _per_window_s(int8, sample[:20])  # warm up
        rounds_fp32, rounds_int8 = [], []
        for _ in range(rounds):
            rounds_fp32.append(_per_window_s(fp32, sample))
            rounds_int8.append(_per_window_s(int8, sample))
    finally:
        os.sched_setaffinity(0, previous)
    t_fp32, t_int8 = np.concatenate(rounds_fp32), np.concatenate(rounds_int8)
    f1_fp32, f1_int8 = macro_f1(truth, preds["fp32"]), macro_f1(truth, preds["int8"])
    agree = float(np.mean([a == b for a, b in zip(preds["fp32"], preds["int8"], strict=True)]))
    return {
        "edge.int8_over_fp32_latency": float(np.median(t_int8) / np.median(t_fp32)),
        "edge.int8_macro_f1_delta": f1_fp32 - f1_int8,
        "edge.fp32_macro_f1": f1_fp32,
        "edge.int8_macro_f1": f1_int8,
        "edge.int8_fp32_agreement": agree,
        "edge.int8_latency_ms": float(np.median(t_int8) * 1000),
        "edge.fp32_latency_ms": float(np.median(t_fp32) * 1000),
        "edge.compare_windows": float(len(x)),
    }
