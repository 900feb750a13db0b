"""Record the privacy gate's per-chunk VAD probabilities once, replay decision rules offline.

Owns: tuning tooling for ``edge_daemon.privacy.gate`` on the real-speech streams of
``benchmarks.privacy_real`` (never used by the device). For each stream segment it
conditions the audio exactly as the gate's detectors do, runs the Silero encoder once,
and steps the recurrent decoder for several state schedules side by side (never reset;
zeroed every ``P`` chunks at some offset; restarted from a warm state); the
probabilities are cached under ``benchmarks/.cache/gate-replay/``. ``simulate`` then
applies a decision rule (which states, thresholds, margins, look-ahead) to the cached
probabilities and scores leakage and yield per cell in milliseconds.

``add_check`` adds the second detector's score per window (``speech_check``, scored
on the windows' upload features, which are cached apart), so a rule can count what
both detectors let through.

    python -m benchmarks.gate_replay --split all   # record (once), replay the defaults
    python -m benchmarks.gate_replay --verify      # replay == PrivacyGate, two sources

Invariants:
- ``rule_for(GateConfig())`` replayed reproduces ``PrivacyGate`` (speech check off)
  window for window (``--verify``: two sources, far-field at 0 dB);
- only the tuning split may be used to choose settings; held-out sources are replayed
  only to report (the CLI prints them apart);
- caches are keyed by source, variant, detectors and schedule count; delete
  ``benchmarks/.cache/gate-replay/`` after changing the conditioning or the layout.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks import privacy_real as pr
from benchmarks import real_speech as rs
from benchmarks.privacy import FRAMES_PER_WINDOW, kept_frame_mask, score
from fleet_protocol.features import FEATURE_VERSION

log = logging.getLogger(__name__)
CACHE = Path(__file__).resolve().parent / ".cache" / "gate-replay"
SR = 16_000
CHUNK = 512
PER_S = SR / CHUNK  # 31.25 chunks per second
F32 = npt.NDArray[np.float32]

# name -> (period in chunks (0: never), offset in chunks, init "zero" | "warm")
SCHEDULES: dict[str, tuple[int, int, str]] = {
    "never": (0, 0, "zero"),
    "twinA": (312, 0, "zero"),
    "twinB": (312, 156, "zero"),
    "r4a": (125, 0, "zero"),
    "r4b": (125, 62, "zero"),
    "w3a": (94, 0, "warm"),
    "w3b": (94, 47, "warm"),
}


def ages(n: int, period: int, offset: int) -> npt.NDArray[np.int64]:
    i = np.arange(n)
    if not period:
        return i
    return np.where(i >= offset, (i - offset) % period, i) if offset else i % period


def warm_state(model: object) -> F32:
    """The decoder state after 3 s of quiet pink-ish noise, from zeros."""
    from edge_daemon.privacy.vad import context_inputs

    rng = np.random.default_rng(0)
    x = np.cumsum(rng.standard_normal(3 * SR)) * 0.002
    x = x - np.convolve(x, np.ones(64) / 64, mode="same")
    x = (x / np.sqrt(np.mean(x * x)) * 0.1).astype(np.float32)
    chunks = x[: x.size // CHUNK * CHUNK].reshape(-1, 1, CHUNK)
    gates = model.encode(context_inputs(np.zeros((1, 64), np.float32), chunks).reshape(-1, 576))  # type: ignore[attr-defined]
    state = np.zeros((2, 1, 128), dtype=np.float32)
    for g in gates:
        _, state = model.step(g[None], state)  # type: ignore[attr-defined]
    return state[:, 0]


def probe_segment(audio: F32, detectors: tuple[str, ...], model: object, warm: F32) -> F32:
    """``(chunks, detectors, schedules)`` probabilities for one stream segment."""
    from edge_daemon.privacy.gate import GateConfig, _Detector
    from edge_daemon.privacy.vad import context_inputs

    cfg = GateConfig(detectors=detectors)
    dets = [_Detector(cfg, k) for k in detectors]
    lag = max(-(-d.delay // CHUNK) for d in dets)
    n = -(-audio.size // CHUNK) + lag
    x = np.zeros(n * CHUNK, dtype=np.float32)
    x[: audio.size] = audio
    chunks = x.reshape(n, CHUNK)
    prepared = np.stack([d.prepare(chunks) for d in dets], axis=1)  # (n, k, 512)
    k = len(dets)
    inputs = context_inputs(np.zeros((k, 64), np.float32), prepared)
    gates = model.encode(inputs.reshape(n * k, -1)).reshape(n, k, -1)  # type: ignore[attr-defined]
    names = list(SCHEDULES)
    s = len(names)
    state = np.zeros((2, s * k, 128), dtype=np.float32)
    age = np.stack([ages(n, *SCHEDULES[m][:2]) for m in names], axis=1)  # (n, s)
    out = np.empty((n, k, s), dtype=np.float32)
    for i in range(n):
        for j, m in enumerate(names):
            if i > 0 and age[i, j] == 0:
                state[:, j * k : (j + 1) * k] = warm[:, None] if SCHEDULES[m][2] == "warm" else 0.0
        p, state = model.step(np.concatenate((gates[i],) * s), state)  # type: ignore[attr-defined]
        out[i] = p.reshape(s, k).T
    return out


@dataclass
class Stream:
    source: str
    split: str
    kind: str
    snr_db: float
    variant: str
    probs: list[F32]  # per segment (chunks, detectors, schedules)
    speech: list[npt.NDArray[np.bool_]]
    lookalike: list[npt.NDArray[np.bool_]]
    samples: list[int]
    check: list[F32] | None = None  # per segment: the speech check's score per window


def window_features(audio: F32) -> F32:
    """The upload features of every whole window of a segment."""
    from fleet_protocol.features import features_batch

    n = audio.size // SR
    return features_batch(audio[: n * SR].reshape(n, SR))


def features_file(source: str, variant: str) -> Path:
    return CACHE / f"{source}-{variant}-features-{FEATURE_VERSION}.pkl"


def add_check(streams: list[Stream], check: object | None = None) -> None:
    """Fill ``Stream.check`` with the speech check's score per window (``check``, or the
    shipped model). The windows' upload features are cached per source and variant,
    apart from the VAD's probabilities, so another check model scores in seconds."""
    from edge_daemon.privacy.speech_check import SpeechCheck

    model = check if check is not None else SpeechCheck()
    for st in streams:
        f = features_file(st.source, st.variant)
        if f.exists():
            table = pickle.loads(f.read_bytes())
        elif st.source.startswith("espeak-"):
            continue  # recorded before features were kept: record_synthetic again
        else:
            src = rs.BY_NAME[st.source]
            table = {
                snr: [window_features(seg.audio) for seg in pr.build(src, snr, st.variant)]
                for snr in pr.SNRS_DB
            }
            f.write_bytes(pickle.dumps(table))
            log.info("upload features for %s %s", st.source, st.variant)
        st.check = [model.scores(x) for x in table[st.snr_db]]  # type: ignore[attr-defined]


def record(
    sources: tuple[rs.Source, ...],
    detectors: tuple[str, ...] = ("denoise", "raw"),
    variants: tuple[str, ...] = pr.VARIANTS,
) -> list[Stream]:
    from edge_daemon.privacy.vad import SileroVad

    CACHE.mkdir(parents=True, exist_ok=True)
    rs.fetch()
    model = SileroVad(threads=1).model
    warm = warm_state(model)
    out: list[Stream] = []
    for src in sources:
        for variant in variants:
            f = CACHE / f"{src.name}-{variant}-{'-'.join(detectors)}-{len(SCHEDULES)}.pkl"
            if f.exists():
                out.extend(Stream(**d) for d in pickle.loads(f.read_bytes()))
                continue
            got: list[Stream] = []
            feats: dict[float, list[F32]] = {}
            for snr in pr.SNRS_DB:
                segs = pr.build(src, snr, variant)
                feats[snr] = [window_features(s.audio) for s in segs]
                got.append(
                    Stream(
                        src.name, src.split, src.kind, snr, variant,
                        [probe_segment(s.audio, detectors, model, warm) for s in segs],
                        [s.speech for s in segs], [s.lookalike for s in segs],
                        [s.audio.size for s in segs],
                    )
                )  # fmt: skip
            f.write_bytes(pickle.dumps([vars(g) for g in got]))
            ff = features_file(src.name, variant)
            if not ff.exists():
                ff.write_bytes(pickle.dumps(feats))
            log.info("recorded %s %s", src.name, variant)
            out.extend(got)
    return out


@dataclass(frozen=True)
class Rule:
    """A decision rule over recorded probabilities (see ``GateConfig``)."""

    states: tuple[str, ...] = ("never", "twinA", "twinB")
    min_age: float = 5.0  # s: restarted states count only once this old
    threshold: float = 0.5
    hysteresis: float = 0.1
    before_s: float = 0.25
    after_s: float = 0.75
    detectors: tuple[int, ...] = (0, 1)
    delays: tuple[int, ...] = (1, 0)  # chunks each detector's flags reach back
    unsure: float = 1.0  # a chunk >= this (but < threshold) is "unsure"...
    unsure_before_s: float = 0.0  # ...and drops windows this far after it (look-back)
    unsure_after_s: float = 0.0  # ...and this far before it
    warmup_s: float = 0.0  # windows starting this early in a stream are dropped
    check: float | None = None  # the speech check's threshold (None: no check)
    fresh_threshold: float = 0.0  # a restarted state counts only at or above this
    votes: int = 1  # restarted states that must agree (never-reset: alone)
    own: tuple[tuple[str, float], ...] = ()  # (state, its own threshold): scaled to ``threshold``


def rule_for(config: object) -> Rule:
    """The replay rule of a ``GateConfig`` whose states are among ``SCHEDULES``."""
    from edge_daemon.privacy.gate import GateConfig

    assert isinstance(config, GateConfig)
    if config.vad_states == "twin" or not config.vad_reset_s:
        raise ValueError("only the 'all' state scheme is replayed")
    names = {10.0: ("twinA", "twinB"), 4.0: ("r4a", "r4b"), 3.0: ("w3a", "w3b")}
    states: tuple[str, ...] = ("never",)
    for j, period in enumerate(config.restart_periods_s()):
        if period:
            if period not in names or (j == 2) != (period == 3.0):
                raise ValueError(f"restart period {period} s is not recorded")
            states += names[period]
    return Rule(
        states=states, min_age=config.min_state_age_s, threshold=config.threshold,
        hysteresis=config.hysteresis, before_s=config.margin_before_s,
        after_s=config.margin_after_s, votes=config.vad_votes, warmup_s=config.warmup_s,
    )  # fmt: skip


def flags(p: F32, rule: Rule, lo: float, hi: float) -> npt.NDArray[np.bool_]:
    """Per chunk: any detector speech at thresholds (hi on, lo hold) on the combined
    probability: the never-reset state's, or the ``votes``-th highest restarted one's."""
    names = list(SCHEDULES)
    n = p.shape[0]
    never = np.zeros((n, p.shape[1]), dtype=np.float32)
    fresh: list[F32] = []
    for m in rule.states:
        j = names.index(m)
        period, offset, _ = SCHEDULES[m]
        a = ages(n, period, offset)
        ok = (a >= round(rule.min_age * PER_S)) if period else np.ones(n, dtype=np.bool_)
        q = p[:, :, j]
        if period and rule.fresh_threshold:
            q = np.where(q >= rule.fresh_threshold, q, 0.0)
        for name, thr in rule.own:
            if name == m:
                q = np.minimum(1.0, q * (rule.threshold / thr))
        q = np.where(ok[:, None], q, 0.0)
        if period:
            fresh.append(q)
        else:
            never = np.maximum(never, q)
    comb = never
    if fresh:
        f = np.sort(np.stack(fresh), axis=0)  # ascending over states
        comb = np.maximum(comb, f[-min(rule.votes, len(fresh))])
    out = np.zeros(n, dtype=np.bool_)
    for d, back in zip(rule.detectors, rule.delays, strict=True):
        c = comb[:, d]
        s = np.zeros(n, dtype=np.bool_)
        prev = False
        on = c >= hi
        hold = c >= lo
        for i in range(n):
            prev = bool(on[i] or (prev and hold[i]))
            s[i] = prev
        if back:
            s[:-back] |= s[back:]
        out |= s
    return out


def kept_windows(p: F32, samples: int, rule: Rule) -> list[int]:
    """Start samples of the windows the rule releases for one segment (flushed at its end)."""
    sp = flags(p, rule, rule.threshold - rule.hysteresis, rule.threshold)
    un = flags(p, rule, rule.unsure, rule.unsure) if rule.unsure < rule.threshold else None
    before, after = round(rule.before_s * SR), round(rule.after_s * SR)
    ub, ua = round(rule.unsure_before_s * SR), round(rule.unsure_after_s * SR)
    kept = []
    for w in range(samples // SR):
        start, end = w * SR, (w + 1) * SR
        if end + max(after, ua) > samples or start < rule.warmup_s * SR:
            continue  # unvetted at flush, or in the warm-up
        lo, hi = max(0, (start - before) // CHUNK), -(-(end + after) // CHUNK)
        if sp[lo:hi].any():
            continue
        if un is not None:
            lo, hi = max(0, (start - ub) // CHUNK), -(-(end + ua) // CHUNK)
            if un[lo:hi].any():
                continue
        kept.append(start)
    return kept


def simulate(streams: list[Stream], rule: Rule) -> list[pr.Cell]:
    cells = []
    for st in streams:
        counts = np.zeros(6, dtype=np.int64)
        leaked: list[float] = []
        ln = lk = 0
        for k, (p, sp, look, n) in enumerate(
            zip(st.probs, st.speech, st.lookalike, st.samples, strict=True)
        ):
            kept = kept_windows(p, n, rule)
            if rule.check is not None and st.check is not None:
                kept = [w for w in kept if st.check[k][w // SR] < rule.check]
            mask = kept_frame_mask(kept, sp.size)
            counts += np.array(score(sp, mask), dtype=np.int64)
            per_win = (sp & mask).reshape(-1, FRAMES_PER_WINDOW).sum(axis=1)
            leaked.extend(k * pr.SEGMENT_S + float(w) for w in np.flatnonzero(per_win))
            win_kept = mask.reshape(-1, FRAMES_PER_WINDOW).all(axis=1)
            ln += int(look.sum())
            lk += int((look & win_kept).sum())
        cells.append(
            pr.Cell(st.source, st.split, st.kind, st.snr_db, st.variant,
                    tuple(int(v) for v in counts), ln, lk, tuple(leaked))
        )  # fmt: skip
    return cells


def summary(cells: list[pr.Cell], split: str) -> str:
    run = pr.RealRun(tuple(c for c in cells if c.split == split), 0.0, 0.0)
    sel = [c for c in run.cells if c.kind != "lookalike"]
    den = sum(c.counts[0] for c in sel)
    pooled = sum(c.counts[1] for c in sel) / den if den else 0.0
    bad = sorted(sel, key=lambda c: -c.leakage)[:3]
    worst = ", ".join(f"{c.source} {c.variant} {c.snr_db:g}: {c.leakage:.4f}" for c in bad)
    return (
        f"{split}: worst {run.worst():.4f} pooled {pooled:.5f} yield10 {run.yield_at(10.0):.3f} "
        f"leaky cells {sum(c.counts[1] > 0 for c in sel)}/{len(sel)} [{worst}]"
    )


def record_synthetic(
    languages: tuple[str, ...],
    detectors: tuple[str, ...] = ("denoise", "raw"),
    scene_s: int = 180,
    snrs_db: tuple[float, ...] | None = None,
) -> list[Stream]:
    """The espeak-ng scenes of ``benchmarks.privacy`` (one 3-minute stream per cell)."""
    from benchmarks import privacy as pv
    from devstack.scene.stream import SceneSpec, render_scene
    from edge_daemon.privacy.vad import SileroVad

    CACHE.mkdir(parents=True, exist_ok=True)
    model = SileroVad(threads=1).model
    warm = warm_state(model)
    out: list[Stream] = []
    snrs = pv.SNRS_DB if snrs_db is None else snrs_db
    tag = "" if snrs == pv.SNRS_DB else "-at" + "-".join(f"{s:g}" for s in snrs)
    for lang in languages:
        f = CACHE / f"espeak-{lang}-{scene_s}-{'-'.join(detectors)}-{len(SCHEDULES)}{tag}.pkl"
        if f.exists():
            out.extend(Stream(**d) for d in pickle.loads(f.read_bytes()))
            continue
        got: list[Stream] = []
        feats: dict[float, list[F32]] = {}
        for snr in snrs:
            spec = SceneSpec(
                seed=pv.BASE_SEED + 1000 * pv.LANGUAGES_INDEX.get(lang, 99),
                duration_s=scene_s, speech_rate=pv.SPEECH_RATE,
                speech_snr_db=(snr, snr), languages=(lang,),
            )  # fmt: skip
            scene = render_scene(spec, None)
            audio = np.asarray(scene.audio, dtype=np.float32)
            feats[snr] = [window_features(audio)]
            got.append(
                Stream(
                    f"espeak-{lang}", "synthetic", "sentences", snr, "dry" + tag,
                    [probe_segment(audio, detectors, model, warm)],
                    [np.asarray(scene.speech_frames, dtype=np.bool_)],
                    [np.zeros(audio.size // SR, dtype=np.bool_)], [audio.size],
                )
            )  # fmt: skip
        f.write_bytes(pickle.dumps([vars(g) for g in got]))
        features_file(f"espeak-{lang}", "dry" + tag).write_bytes(pickle.dumps(feats))
        log.info("recorded espeak %s", lang)
        out.extend(got)
    return out


def verify() -> int:
    """Run the real gate (speech check off) and the replay on two streams; 0 if equal."""
    from edge_daemon.privacy.gate import GateConfig, PrivacyGate
    from edge_daemon.privacy.vad import SileroVad

    rs.fetch()
    vad = SileroVad(threads=1)
    warm = warm_state(vad.model)
    config = GateConfig(speech_check=False)
    gate, rule = PrivacyGate(config, vad), rule_for(config)
    bad = 0
    for name in ("klettres-de", "codec2-mmt1"):
        for seg in pr.build(rs.BY_NAME[name], 0.0, "far"):
            kept: list[int] = []
            for i in range(0, seg.audio.size, 1600):
                kept += [w.start_sample for w in gate.push(seg.audio[i : i + 1600])]
            kept += [w.start_sample for w in gate.flush()]
            probs = probe_segment(seg.audio, config.detectors, vad.model, warm)
            same = kept == kept_windows(probs, seg.audio.size, rule)
            bad += not same
            print(name, "replay == gate" if same else "DIFFERENT", len(kept), "kept")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tune", "held", "all"), default="tune")
    ap.add_argument("--sources", nargs="*", default=None)
    ap.add_argument("--synthetic", action="store_true", help="record the espeak bench scenes")
    ap.add_argument("--verify", action="store_true", help="replay == PrivacyGate on two sources")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.verify:
        return verify()
    if args.synthetic:
        from benchmarks.privacy import LANGUAGES

        record_synthetic(LANGUAGES)
        return 0
    srcs = tuple(
        s for s in rs.SOURCES
        if args.split in ("all", s.split)
        and (not args.sources or s.name in args.sources)
    )  # fmt: skip
    from edge_daemon.privacy.gate import GateConfig

    streams = record(srcs)
    add_check(streams)
    rule = rule_for(GateConfig())
    cells = simulate(streams, rule)
    for split in ("tune", "held"):
        if any(c.split == split for c in cells):
            print("VAD only:", summary(cells, split))
    from edge_daemon.privacy.speech_check import SpeechCheck

    cells = simulate(streams, Rule(**{**rule.__dict__, "check": SpeechCheck().threshold}))
    for split in ("tune", "held"):
        if any(c.split == split for c in cells):
            print("VAD + speech check:", summary(cells, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
