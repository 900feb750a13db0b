"""The on-device path in a process of its own, pinned to one CPU core: what ``edge.rtf_one_core``
and ``edge.peak_rss_mb`` measure.

file capture (``open_source``) → privacy gate (Silero VAD) → log-mel → int8 onnxruntime
(one thread) → selection → SQLite replay buffer (WAL, encrypted; a software storage key:
the TPM unseals it once at start-up, outside the timed loop). No torch is imported.

Writes ``--out`` (JSON: audio and processing seconds, window counts) and ``--windows``
(npz: index, label, score and float16 features of every window the gate released, for
the int8/fp32 comparison and the uplink simulation).

Run: ``python -m benchmarks.edge_child --cpu 0 --wav W --model M --state DIR --out J --windows N``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.edge_child")
    p.add_argument("--cpu", type=int, required=True, help="the one core to run on")
    p.add_argument("--wav", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="int8 ONNX classifier")
    p.add_argument("--state", type=Path, required=True, help="directory for the replay buffer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--windows", type=Path, required=True)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})  # before numpy/onnxruntime size their thread pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

    t_import = time.perf_counter()
    import json

    import numpy as np

    from edge_daemon.buffer import ReplayBuffer
    from edge_daemon.capture import open_source
    from edge_daemon.config import FileSourceConfig, GatePolicy, SelectionConfig
    from edge_daemon.inference.onnx_backend import OnnxClassifier
    from edge_daemon.pipeline import Classified, make_gate, run_stream
    from edge_daemon.privacy.vad import SileroVad
    from edge_daemon.selection import Selector
    from fleet_protocol.batch import SampleMeta

    t_setup = time.perf_counter()
    source = open_source(FileSourceConfig(path=args.wav))
    gate = make_gate(GatePolicy(), SileroVad(threads=1))
    classifier = OnnxClassifier(args.model, 1)
    buffer = ReplayBuffer(args.state / "buffer.sqlite3", bytes(range(32)))
    selector = Selector(SelectionConfig(), np.random.default_rng(0))
    kept: list[tuple[int, str, float]] = []
    features: list[np.ndarray] = []
    stored = 0

    def on_window(c: Classified) -> None:
        nonlocal stored
        f16 = c.features.astype(np.float16)
        kept.append((c.index, c.label, c.score))
        features.append(f16)
        reason = selector.decide(c.score, stream_s=c.start_s, pending_bytes=buffer.pending_bytes)
        if reason is not None:
            meta = SampleMeta(
                sample_id=os.urandom(16).hex(),
                captured_at_ms=int(time.time() * 1000),
                stream_offset_s=c.start_s,
                predicted=c.label,
                score=min(1.0, max(0.0, c.score)),
                model_sha256=c.model_sha256,
                reason=reason,
            )
            stored += buffer.add(meta, f16)

    t0, c0 = time.perf_counter(), time.process_time()
    stats = run_stream(source.blocks(), gate, lambda: classifier, on_window)
    process_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    buffer.close()
    result = {
        "audio_s": source.duration_s,
        "process_s": process_s,
        "cpu_s": cpu_s,
        "import_s": t_setup - t_import,
        "setup_s": t0 - t_setup,
        "windows_in": stats.windows_in,
        "windows_kept": stats.windows_kept,
        "samples_stored": stored,
        "torch_imported": "torch" in sys.modules,
        "vad_cpu_s": gate.stats.vad_cpu_s,  # inside the loop: the VAD's own share of cpu_s
        "check_cpu_s": gate.stats.check_cpu_s,
        "condition_cpu_s": gate.stats.condition_cpu_s,
        "vm_hwm_kib": _vm_hwm_kib(),
    }
    args.out.write_text(json.dumps(result))
    empty = np.zeros((0, 64, 98), dtype=np.float16)
    np.savez(
        args.windows,
        index=np.array([k[0] for k in kept], dtype=np.int64),
        label=np.array([k[1] for k in kept], dtype="U16"),
        score=np.array([k[2] for k in kept], dtype=np.float32),
        features=np.stack(features) if features else empty,
    )
    return 0


def _vm_hwm_kib() -> int:
    """This process's peak resident set since its exec (``VmHWM``; see benchmarks/edge.py)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    sys.exit(main())
