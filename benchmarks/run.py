"""``make bench``: measure, write ``benchmarks/results/latest.json``, refresh ``BENCHMARKS.md``.

The results file is one flat JSON object of numbers, keyed ``<area>.<figure>``. The table
in BENCHMARKS.md between the ``bench:table`` markers is regenerated from it; the rest of
that page is prose and left alone. Each section (``SECTIONS``) returns its keys; a
section that fails stops the run (a benchmark that silently drops keys is worse than
none).

    python -m benchmarks.run                 # 1 h of scene audio (a few minutes)
    python -m benchmarks.run --minutes 10    # shorter scene
    python -m benchmarks.run --quick         # smoke run: 1 min of audio, a tiny base model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import assets

log = logging.getLogger("benchmarks")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
DOC = HERE.parent / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"


@dataclass(frozen=True)
class Goal:
    text: str
    meaning: str
    lower_is_better: bool | None = None  # None: informational
    bound: float = math.nan


GOALS: dict[str, Goal] = {
    "edge.rtf_one_core": Goal(
        "≤ 0.01", "CPU s / audio s: file → gate → features → int8 → buffer, one core", True, 0.01
    ),
    "edge.rtf_over_vad": Goal(
        "≤ 1.25",
        "whole device pipeline CPU s / the VAD's own CPU s (encoder + LSTM steps), same run",
        True,
        1.25,
    ),
    "edge.vad_rtf": Goal("", "the VAD's CPU s / audio s in that run"),
    "edge.speech_check_rtf": Goal("", "the second speech check's CPU s / audio s in that run"),
    "edge.vad_condition_rtf": Goal(
        "", "conditioning the VAD's views (denoise STFT, AGC) CPU s / audio s in that run"
    ),
    "edge.rtf_wall_one_core": Goal("", "the same, wall-clock s (includes other processes)"),
    "edge.rtf_audio_s": Goal("", "seconds of scene audio the RTF was measured over"),
    "edge.setup_s": Goal("", "child start-up: imports, VAD and model load (not in the RTF)"),
    "edge.peak_rss_mb": Goal("≤ 300", "peak RSS of the one-core pipeline process (MiB)", True, 300),
    "edge.int8_over_fp32_latency": Goal(
        "≤ 0.6", "int8 / fp32 latency per window, batch 1, one thread", True, 0.6
    ),
    "edge.int8_macro_f1_delta": Goal(
        "≤ 0.01", "fp32 macro-F1 minus int8 macro-F1, same windows", True, 0.01
    ),
    "edge.fp32_macro_f1": Goal("", "macro-F1 of the fp32 base on the released windows"),
    "edge.int8_macro_f1": Goal("", "macro-F1 of the int8 base on the same windows"),
    "edge.int8_fp32_agreement": Goal("", "share of windows where int8 and fp32 agree"),
    "edge.int8_latency_ms": Goal("", "int8 latency per window (ms)"),
    "edge.fp32_latency_ms": Goal("", "fp32 latency per window (ms)"),
    "edge.compare_windows": Goal("", "windows in the int8/fp32 comparison"),
    "edge.uplink_over_raw": Goal(
        "≤ 0.001",
        "uploaded / raw 16-bit bytes over a simulated day, the daemon's defaults",
        True,
        0.001,
    ),
    "edge.uplink_bytes_per_day": Goal("", "sealed bytes uploaded in that day"),
    "edge.uplink_samples_per_day": Goal("", "samples uploaded in that day"),
    "bench.loadavg_1m": Goal(
        "", "1-min load average, the higher of start and end (timing context)"
    ),
    "bench.cpus": Goal("", "CPUs of the machine"),
    "bench.wall_s": Goal("", "seconds the whole run took"),
    "edge.uplink_over_raw_unbudgeted": Goal(
        "", "the same ratio with the daily uplink cap lifted (as the demo does)"
    ),
    "privacy.max_leakage": Goal(
        "≤ 0.001",
        "speech frames kept / speech frames, worst cell: espeak language x SNR and real "
        "source x SNR x variant (0-20 dB)",
        True,
        0.001,
    ),
    "privacy.real_speech_max_leakage": Goal(
        "≤ 0.001",
        "the same over the real recordings only (tuning and held-out voices)",
        True,
        0.001,
    ),
    "privacy.real_heldout_max_leakage": Goal(
        "", "worst real held-out source x SNR x variant (never tuned on)"
    ),
    "privacy.real_tuning_max_leakage": Goal("", "worst real tuning source x SNR x variant"),
    "privacy.real_tune_leakage_pooled": Goal("", "real tuning voices, all cells pooled"),
    "privacy.real_held_leakage_pooled": Goal("", "real held-out voices, all cells pooled"),
    "privacy.real_yield_10db": Goal(
        "", "non-speech frames kept at 10 dB in the real-speech streams (dense speech)"
    ),
    "privacy.real_lookalike_kept": Goal(
        "", "windows holding instrument notes (not speech) that were kept"
    ),
    "privacy.real_audio_s": Goal("", "seconds of real-speech streams through the gate"),
    "privacy.real_sources": Goal("", "real-speech sources (voices or voice sets)"),
    "privacy.synthetic_max_leakage": Goal("", "worst espeak language x SNR cell"),
    "privacy.yield_10db": Goal(
        "≥ 0.85", "non-speech frames kept / non-speech frames at 10 dB SNR", False, 0.85
    ),
    "privacy.stoi_reconstructed": Goal(
        "≤ 0.45",
        "STOI of speech rebuilt from the upload (third octaves, 120 ms), best attack",
        True,
        0.45,
    ),
    "privacy.asr_wer_reconstructed": Goal(
        "≥ 0.9",
        "pocketsphinx WER on that rebuilt speech (vs its words on the clean recording)",
        False,
        0.9,
    ),
    "privacy.estoi_reconstructed": Goal("", "ESTOI of the same"),
    "privacy.logmel_stoi_reconstructed": Goal(
        "", "STOI rebuilt from the replaced upload (64-band 10 ms log-mel), best attack"
    ),
    "privacy.logmel_estoi_reconstructed": Goal("", "ESTOI of the same"),
    "privacy.logmel_asr_wer_reconstructed": Goal("", "ASR WER rebuilt from the replaced log-mel"),
    "privacy.representation_macro_f1_delta": Goal(
        "≥ -0.05",
        "scene macro-F1, upload representation minus the replaced log-mel (same small CNN)",
        False,
        -0.05,
    ),
    "privacy.white_noise_stoi": Goal("", "STOI floor: white noise against the same speech"),
    "privacy.white_noise_estoi": Goal("", "ESTOI floor of white noise"),
    "privacy.window_yield_10db": Goal(
        "", "speech-free 1 s windows kept / speech-free windows at 10 dB SNR"
    ),
    "privacy.languages": Goal("", "espeak-ng languages in the privacy benchmark"),
    "privacy.audio_s": Goal("", "seconds of audio through the gate in the privacy benchmark"),
    "privacy.gate_rtf": Goal("", "gate processing s / audio s in the privacy benchmark"),
    "ota.wire_overhead": Goal(
        "≤ 1.10",
        "bytes a device received for one update through the broker (TUF metadata + chunk"
        " framing + adapter + its golden clips, MQTT payloads) / adapter bytes, mean over the"
        " rollout's devices",
        True,
        1.10,
    ),
    "ota.rollout_200_seconds": Goal(
        "≤ 60",
        "one update to 200 simulated devices through Mosquitto (mTLS, per-device ACL, one"
        " connection and identity each; sidecar serving with SoftHSM-signed TUF) until all"
        " report CONFIRMED on ota/status",
        True,
        60,
    ),
    "ota.rollout_200_failures": Goal("= 0", "devices not CONFIRMED in that rollout", True, 0),
    "ota.rollout_devices": Goal("", "devices in the broker rollout (200; 20 with --quick)"),
    "ota.rollout_200_inproc_seconds": Goal(
        "",
        "the same device path for 200 devices in one process, no broker (request/response"
        " through the codec only): the broker's and TLS's share is the difference",
    ),
    "ota.rollout_200_inproc_failures": Goal("= 0", "devices not CONFIRMED in process", True, 0),
    "ota.adapter_bytes": Goal("", "the update's size in the OTA benchmark"),
    "train.base_scene_macro_f1": Goal(
        "≥ 0.75",
        "int8 base on the bench scene's speech-free windows (two-tone sirens it never saw)",
        False,
        0.75,
    ),
    "train.adapter_over_base_bytes": Goal(
        "≤ 0.05",
        "edge adapter (lora-lowrank-v1, config defaults) bytes / int8 base model bytes",
        True,
        0.05,
    ),
    "train.adapter_scene_macro_f1_gain": Goal(
        "≥ 0.05",
        "int8 base + one device's adapter minus the int8 base, same windows",
        False,
        0.05,
    ),
    "train.base_scene_fp32_macro_f1": Goal("", "the fp32 base on the same windows"),
    "train.adapter_scene_macro_f1": Goal("", "int8 base + adapter on the same windows"),
    "train.scene_windows": Goal("", "speech-free windows of the bench scene scored"),
    "train.adapter_bytes": Goal("", "the edge adapter's bytes"),
    "train.base_int8_bytes": Goal("", "the int8 base model's bytes"),
    "train.adapter_train_s": Goal("", "seconds to train and convert that adapter"),
    "train.adapter_rank": Goal("", "LoRA rank (TrainConfig default)"),
    "train.adapter_layers": Goal("", "layers LoRA adapts (TrainConfig default)"),
    "train.base_pretrain_s": Goal("", "base pretraining: reading the dataset + training (s)"),
}


@dataclass(frozen=True)
class Options:
    minutes: int
    quick: bool
    work: Path


def edge_section(opt: Options) -> dict[str, float]:
    from benchmarks.edge import compare_models, run_pipeline
    from benchmarks.uplink import simulate_day
    from edge_daemon.config import SelectionConfig

    if opt.quick:
        int8, fp32 = _quick_base(opt.work)
    else:
        int8, fp32 = assets.base_model_int8_fp32()
    scene = assets.scene_files(opt.minutes * 60)
    log.info("pipeline: %d s of audio on one core", scene.duration_s)
    run = run_pipeline(scene.wav, int8, opt.work / "edge")
    if run.torch_imported:
        raise RuntimeError("the device path imported torch")
    out: dict[str, float] = {
        "edge.rtf_one_core": run.cpu_s / run.audio_s,
        "edge.rtf_wall_one_core": run.process_s / run.audio_s,
        "edge.rtf_audio_s": run.audio_s,
        "edge.setup_s": run.setup_s,
        "edge.peak_rss_mb": run.peak_rss_mb,
        "edge.rtf_over_vad": run.cpu_s / run.vad_cpu_s if run.vad_cpu_s else math.inf,
        "edge.vad_rtf": run.vad_cpu_s / run.audio_s,
        "edge.speech_check_rtf": run.check_cpu_s / run.audio_s,
        "edge.vad_condition_rtf": run.condition_cpu_s / run.audio_s,
    }
    log.info("int8 vs fp32 on %d released windows", run.windows_kept)
    out |= compare_models(
        fp32, int8, run.windows, scene.window_labels, rounds=2 if opt.quick else 5
    )
    log.info("uplink: a simulated day")
    budgeted = simulate_day(
        run.windows,
        run.audio_s,
        SelectionConfig(),  # the device default, with its daily uplink cap
    )
    unbudgeted = simulate_day(
        run.windows,
        run.audio_s,
        SelectionConfig(uplink_bytes_per_day=None),
        max_span_s=run.audio_s,
    )
    out |= {
        "edge.uplink_over_raw": budgeted.ratio,
        "edge.uplink_bytes_per_day": float(budgeted.uploaded_bytes),
        "edge.uplink_samples_per_day": float(budgeted.samples),
        "edge.uplink_over_raw_unbudgeted": unbudgeted.ratio,
    }
    return out


def _quick_base(work: Path) -> tuple[Path, Path]:
    """A tiny base model for smoke runs: figures are meaningless, the code path is not."""
    base = assets.base_model(quick=True)
    return base.onnx_int8, base.onnx_fp32


# Markdown tables beside the key table: name -> table, refreshed between
# ``<!-- bench:<name>:begin -->`` and ``<!-- bench:<name>:end -->`` in BENCHMARKS.md.
TABLES: dict[str, str] = {}


def privacy_section(opt: Options) -> dict[str, float]:
    from benchmarks import privacy, privacy_real, real_speech
    from edge_daemon.privacy.gate import GateConfig, PrivacyGate
    from edge_daemon.privacy.vad import SileroVad

    if opt.quick:
        run = privacy.run_privacy(privacy.QUICK_LANGUAGES, scene_s=20)
    else:
        run = privacy.run_privacy()
    TABLES["privacy"] = privacy.render_table(run)
    out = privacy.results(run)
    vad = SileroVad(threads=1)
    sources = privacy_real.quick_sources() if opt.quick else real_speech.SOURCES
    real = privacy_real.run_real(lambda: PrivacyGate(GateConfig(), vad), sources)
    TABLES["privacy-real"] = privacy_real.render_table(real)
    out |= privacy_real.results(real)
    out["privacy.synthetic_max_leakage"] = out["privacy.max_leakage"]
    out["privacy.max_leakage"] = max(out["privacy.max_leakage"], real.worst())
    return out


def privacy_attack_section(opt: Options) -> dict[str, float]:
    from benchmarks import privacy_attack as pa
    from benchmarks.representations import BY_NAME

    reps = (BY_NAME[pa.BASELINE], BY_NAME[pa.UPLOAD])
    scores, base = pa.attack_all(reps, learned=not opt.quick, quick=opt.quick)
    f1 = pa.macro_f1_by_representation(reps, seeds=(0,) if opt.quick else (0, 1, 2))
    out: dict[str, float] = {}
    for prefix, name in (("privacy.", pa.UPLOAD), ("privacy.logmel_", pa.BASELINE)):
        best = pa.best_attack(scores, name)
        out[prefix + "stoi_reconstructed"] = best.stoi
        out[prefix + "estoi_reconstructed"] = best.estoi
        out[prefix + "asr_wer_reconstructed"] = min(
            s.wer_vs_clean_asr for s in scores if s.representation == name
        )
    out["privacy.representation_macro_f1_delta"] = f1[pa.UPLOAD] - f1[pa.BASELINE]
    out["privacy.white_noise_stoi"] = base["white_noise_stoi"]
    out["privacy.white_noise_estoi"] = base["white_noise_estoi"]
    return out


def ota_section(opt: Options) -> dict[str, float]:
    from benchmarks.ota import run_ota, run_ota_broker

    devices = 20 if opt.quick else 200
    return run_ota(devices=devices) | run_ota_broker(devices=devices)


def train_section(opt: Options) -> dict[str, float]:
    from benchmarks.train_bench import run_train

    keys, table = run_train(opt.minutes, opt.quick, adapter_scene_s=60 if opt.quick else 600)
    TABLES["train"] = table
    return keys


def _tuf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tuf") is not None


SECTIONS = (
    ("edge", edge_section),
    ("train", train_section),
    ("privacy", privacy_section),
    ("privacy-attack", privacy_attack_section),
    # python-tuf is not in the lock yet (docs/adr/0016): without it there is no OTA figure
    *((("ota", ota_section),) if _tuf_installed() else ()),
)


def render_table(results: dict[str, float]) -> str:
    rows = ["| key | value | goal | meets | meaning |", "|---|---|---|---|---|"]

    def order(k: str) -> tuple[bool, bool, str]:  # figures with a goal first, then the rest
        return (GOALS.get(k, Goal("", "")).lower_is_better is None, k.startswith("bench."), k)

    for key in sorted(results, key=order):
        value = results[key]
        goal = GOALS.get(key, Goal("", ""))
        meets = ""
        if goal.lower_is_better is not None:
            ok = value <= goal.bound if goal.lower_is_better else value >= goal.bound
            meets = "yes" if ok else "**no**"
        rows.append(f"| `{key}` | {_fmt(value)} | {goal.text} | {meets} | {goal.meaning} |")
    return "\n".join(rows)


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) >= 10:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1e-3 else f"{v:.4f}".rstrip("0").rstrip(".")


def refresh_doc(doc: Path, results: dict[str, float], note: str) -> None:
    text = doc.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise RuntimeError(f"{doc}: markers {BEGIN} ... {END} not found")
    table = f"{BEGIN}\n{note}\n\n{render_table(results)}\n"
    doc.write_text(text[:start] + table + text[end:])


def refresh_table(doc: Path, name: str, table: str) -> None:
    """Replace the text between ``bench:<name>`` markers (skipped if the doc has none)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = doc.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        log.warning("%s: no %s ... %s markers, %s table not written", doc, begin, end, name)
        return
    doc.write_text(text[:start] + f"{begin}\n{table}\n" + text[stop:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=int, default=60, help="minutes of scene audio (1..60)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 minute, tiny base model")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON to write")
    p.add_argument("--no-doc", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    minutes = 1 if args.quick else args.minutes
    if not 1 <= minutes <= 60:
        p.error("--minutes must be 1..60")
    work = assets.CACHE / ("work-quick" if args.quick else "work")
    opt = Options(minutes, args.quick, work)
    t0, load_start = time.monotonic(), os.getloadavg()[0]
    results: dict[str, float] = {}
    for name, section in SECTIONS:
        log.info("section %s", name)
        results |= {k: float(v) for k, v in section(opt).items()}
    results["bench.quick"] = float(args.quick)
    results["bench.wall_s"] = time.monotonic() - t0
    results["bench.loadavg_1m"] = max(load_start, os.getloadavg()[0])
    results["bench.cpus"] = float(os.cpu_count() or 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not args.no_doc:
        note = f"Last run: `python -m benchmarks.run{' --quick' if args.quick else ''}`" + (
            f" with --minutes {minutes}" if not args.quick and minutes != 60 else ""
        )
        refresh_doc(DOC, results, note + f", {time.strftime('%Y-%m-%d')}.")
        for name, table in TABLES.items():
            refresh_table(DOC, name, table)
    for k in sorted(results):
        print(f"{k:36s} {_fmt(results[k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
