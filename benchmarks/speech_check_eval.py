"""Trade-off curves of the privacy gate's two detectors, replayed from cached scores.

Owns: choosing and reporting the speech check's threshold (and the VAD rule beside it)
on the real-speech streams of ``benchmarks.gate_replay``: for each threshold, leakage
of what *both* detectors let through (tuning pooled and worst cell; held-out pooled
and worst cell, printed apart and never used to choose), yield at 10 dB on those
streams, each detector's own miss rate (speech frames inside windows that detector
alone would pass), and the share of the espeak bench's speech-free windows the check
flags.

Invariants:
- settings are chosen on ``split == "tune"`` cells only; held-out rows are reports;
- the espeak-bench figure (``espeak_flag_rate``) renders the bench's own scenes
  (``benchmarks.privacy`` seeds, 10 dB) and scores the check on the windows the VAD's
  margins leave free (no speech frame within 0.5 s before or 0.75 s after): an
  estimate of the yield the check costs there, assuming its flags are independent of
  the VAD's false alarms; the replayed figure (``gate_replay --synthetic``) replaces it
  when recorded.

    python -m benchmarks.speech_check_eval [--model DIR] [--thresholds 0.05 0.1 ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks import gate_replay as gr
from benchmarks import privacy_real as pr
from benchmarks import real_speech as rs

log = logging.getLogger(__name__)
SR = 16_000
F32 = npt.NDArray[np.float32]


def pooled(cells: list[pr.Cell], split: str) -> tuple[float, float, float]:
    """(pooled leakage, worst cell, yield at 10 dB) over one split's speech cells."""
    sel = [c for c in cells if c.split == split and c.kind != "lookalike"]
    den = sum(c.counts[0] for c in sel)
    pool = sum(c.counts[1] for c in sel) / den if den else 0.0
    worst = max((c.leakage for c in sel), default=0.0)
    at10 = [c for c in cells if c.split == split and c.snr_db == 10.0]
    yd = sum(c.counts[2] for c in at10)
    return pool, worst, (sum(c.counts[3] for c in at10) / yd if yd else 0.0)


def check_miss(streams: list[gr.Stream], threshold: float, split: str) -> float:
    """Speech frames in windows the check alone passes / speech frames (one split)."""
    n = k = 0
    for st in streams:
        if st.split != split or st.kind == "lookalike" or st.check is None:
            continue
        for sp, sc in zip(st.speech, st.check, strict=True):
            per = sp[: sc.size * 100].reshape(-1, 100).sum(axis=1)
            n += int(sp.sum())
            k += int(per[sc < threshold].sum())
    return k / n if n else 0.0


def espeak_flag_rate(check: object, snr_db: float = 10.0) -> float:
    """Share of the espeak bench's VAD-free speech-free windows the check flags."""
    from benchmarks import privacy as pv
    from devstack.scene.stream import SceneSpec, render_scene
    from fleet_protocol.features import features_batch

    flagged = total = 0
    for lang in pv.LANGUAGES:
        spec = SceneSpec(
            seed=pv.BASE_SEED + 1000 * pv.LANGUAGES_INDEX[lang], duration_s=180,
            speech_rate=pv.SPEECH_RATE, speech_snr_db=(snr_db, snr_db), languages=(lang,),
        )  # fmt: skip
        scene = render_scene(spec)
        sp = np.asarray(scene.speech_frames, dtype=np.bool_)
        free = []
        for w in range(sp.size // 100):
            lo, hi = max(0, w * 100 - 50), min(sp.size, (w + 1) * 100 + 75)
            if not sp[lo:hi].any():
                free.append(w)
        x = np.asarray(scene.audio, dtype=np.float32)[: sp.size // 100 * SR].reshape(-1, SR)
        s = check.scores(features_batch(x[free]))  # type: ignore[attr-defined]
        flagged += int((s >= check.threshold).sum())  # type: ignore[attr-defined]
        total += len(free)
    return flagged / total if total else 0.0


def cached(sources: tuple[rs.Source, ...]) -> list[gr.Stream]:
    """The recorded streams of those sources already in the replay cache (records none)."""
    import pickle

    out: list[gr.Stream] = []
    for src in sources:
        for variant in pr.VARIANTS:
            f = gr.CACHE / f"{src.name}-{variant}-denoise-raw-{len(gr.SCHEDULES)}.pkl"
            if f.exists() and gr.features_file(src.name, variant).exists():
                out.extend(gr.Stream(**d) for d in pickle.loads(f.read_bytes()))
    return out


def synthetic(tag: str = "-at10") -> list[gr.Stream]:
    """The espeak bench's streams recorded by ``gate_replay.record_synthetic`` (10 dB)."""
    import pickle

    from benchmarks import privacy as pv

    out: list[gr.Stream] = []
    for lang in pv.LANGUAGES:
        f = gr.CACHE / f"espeak-{lang}-180-denoise-raw-{len(gr.SCHEDULES)}{tag}.pkl"
        if f.exists():
            out.extend(gr.Stream(**d) for d in pickle.loads(f.read_bytes()))
    return out


def frame_yield(cells: list[pr.Cell]) -> tuple[float, float]:
    """(non-speech frames kept / non-speech frames, leakage) pooled over cells."""
    c = np.sum([x.counts for x in cells], axis=0)
    return (c[3] / c[2] if c[2] else 0.0), (c[1] / c[0] if c[0] else 0.0)


def curve(
    streams: list[gr.Stream],
    rule: gr.Rule,
    thresholds: tuple[float, ...],
    synth: list[gr.Stream] | None = None,
) -> list[dict[str, float]]:
    rows = []
    vad = gr.simulate(streams, rule)
    if synth:
        y, _ = frame_yield(gr.simulate(synth, rule))
        log.info("espeak bench at 10 dB, VAD alone: yield %.4f", y)
    for t in thresholds:
        cells = gr.simulate(streams, gr.Rule(**{**rule.__dict__, "check": t}))
        row = {"threshold": t}
        for split in ("tune", "held"):
            p, w, y = pooled(cells, split)
            row |= {f"{split}_pooled": p, f"{split}_worst": w, f"{split}_yield10": y}
            row[f"{split}_check_miss"] = check_miss(streams, t, split)
            row[f"{split}_vad_miss"] = pooled(vad, split)[0]
        look = pr.RealRun(tuple(cells), 0, 0).lookalike_kept()
        row["lookalike_kept"] = look
        if synth:
            row["espeak_yield10"], row["espeak_leak10"] = frame_yield(
                gr.simulate(synth, gr.Rule(**{**rule.__dict__, "check": t}))
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="dir with speech_check.onnx/.json")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--split", choices=("tune", "held", "all"), default="all")
    ap.add_argument("--espeak", action="store_true", help="also the espeak-bench flag rate")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from edge_daemon.privacy.gate import GateConfig
    from edge_daemon.privacy.speech_check import SpeechCheck

    check = (
        SpeechCheck(args.model / "speech_check.onnx", args.model / "speech_check.json")
        if args.model
        else SpeechCheck()
    )
    srcs = tuple(s for s in rs.SOURCES if args.split in ("all", s.split))
    streams = cached(srcs)
    log.info("%d cached streams", len(streams))
    synth = synthetic()
    gr.add_check(streams + synth, check)
    for row in curve(streams, gr.rule_for(GateConfig()), tuple(args.thresholds), synth):
        print(" ".join(f"{k}={v:.5f}" for k, v in row.items()), flush=True)
    if args.espeak:
        print(f"espeak 10 dB: check flags {espeak_flag_rate(check):.4f} of free windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
