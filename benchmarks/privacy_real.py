"""Privacy benchmark on recordings of real people: single words and short calls after
seconds without speech, at stream start, after a capture restart, after long loud noise.

Owns: laying out a test stream per (source, SNR, acoustic variant) from the
recordings of ``benchmarks.real_speech`` over the scene generator's city sounds, pushing
it through the real gate, and scoring leakage and yield per source and SNR, split into
the *tuning* and the *held-out* voices.

A stream is two 30 s segments with a capture restart between them (``gate.flush()``,
then a new stream, as when the capture process restarts). Each segment opens with a
word 50-300 ms after its start; then, after 3-8 s without speech, a single word
(60 %) or a burst (40 %: 3-5 calls in a row, or a 1.5-4 s piece of read speech), and
so on to its end. Segment 2 holds 10 s of loud construction noise (-15 dBFS) at
12-22 s, followed by a word 0.3 s after it stops. Variants: ``dry`` (the recording
as it is), ``far`` (convolved with a synthetic room response: direct path plus an
exponentially decaying noise tail, RT60 0.6 s, direct-to-reverberant ratio -3 dB: a
talker several metres from the microphone in a street canyon or a hall) and ``room``
(a pyroomacoustics image-method hall, ``shoebox``: RT60 0.3-0.9 s, talker 1.5-6 m
away; its reflections lose highs as a real hall's do; its own draws, so ``dry`` and
``far`` are the same streams as before it was added).

Sources of kind ``overlap`` mix two talkers (``_overlapped``); ``lookalike`` sources
(instrument notes) are not speech and may be kept. What must be dropped: any human
voice, speech, calls, radio or PA voices, singing with words; laughter and other
non-speech vocal sounds are not counted as speech (no recordings of them here yet).

Invariants:
- a stream is a pure function of (source, SNR, variant): every draw comes from one
  generator seeded by the source name, and the same draws are made at every SNR and
  variant (only the speech level or the room differ);
- speech level is ``snr_db`` above the RMS of the city sound under the clip (active
  speech level, floor -50 dBFS), as in ``devstack.scene.stream``;
- ground truth is ``real_speech.speech_mask`` of the clip as mixed (reverberant tail
  included in ``far``); ``lookalike`` sources (instrument notes) have no speech frames;
  they only count in yield and in ``lookalike_kept`` (share of their windows kept);
- leakage and yield are counted as in ``benchmarks.privacy`` (10 ms frames; a frame
  is kept when a released window covers it).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from benchmarks import real_speech as rs
from benchmarks.privacy import BLOCK_SAMPLES, FRAMES_PER_WINDOW, kept_frame_mask, score

log = logging.getLogger(__name__)

SR = 16_000
SEGMENT_S = 30
SNRS_DB: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0)
VARIANTS: tuple[str, ...] = ("dry", "far", "room")
LOUD_AT_S, LOUD_S = 12.0, 10.0
FLOOR_DBFS = -50.0
F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Segment:
    audio: F32
    speech: B  # per 10 ms frame
    lookalike: B  # per 1 s window: holds a lookalike (non-speech) sound


@dataclass(frozen=True)
class Cell:
    source: str
    split: str
    kind: str
    snr_db: float
    variant: str
    counts: tuple[int, ...]  # benchmarks.privacy.score over both segments
    lookalike_windows: int = 0
    lookalike_kept: int = 0
    leaked_events: tuple[float, ...] = field(default=())  # stream seconds of leaked words

    @property
    def leakage(self) -> float:
        return self.counts[1] / self.counts[0] if self.counts[0] else 0.0

    @property
    def yield_(self) -> float:
        return self.counts[3] / self.counts[2] if self.counts[2] else 0.0


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@lru_cache(maxsize=8)
def _bed(seed: int) -> npt.NDArray[np.float64]:
    from devstack.scene.stream import SceneSpec, render_scene

    scene = render_scene(SceneSpec(seed=seed, duration_s=SEGMENT_S, speech_rate=0.0))
    return np.asarray(scene.audio, dtype=np.float64)


@lru_cache(maxsize=2)
def _loud(seed: int) -> npt.NDArray[np.float64]:
    from devstack.scene import sounds

    x = np.asarray(
        sounds.synthesize("construction", int(LOUD_S * SR), np.random.default_rng(seed)),
        dtype=np.float64,
    )
    return x * (10 ** (-15 / 20) / max(1e-9, float(np.sqrt(np.mean(x * x)))))


def room(rng: np.random.Generator, rt60: float = 0.6, drr_db: float = -3.0) -> F32:
    """A synthetic far-field room response (see the module docstring)."""
    n = int(rt60 * SR)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail[: int(0.003 * SR)] = 0.0  # the first reflection 3 ms after the direct path
    tail *= 10 ** (-drr_db / 20) / max(1e-9, float(np.sqrt(np.sum(tail * tail))))
    tail[0] = 1.0
    return np.asarray(tail, dtype=np.float32)


def shoebox(rng: np.random.Generator) -> F32:
    """A simulated hall (pyroomacoustics image method): 8-14 x 6-10 x 3.5-6 m, RT60
    0.3-0.9 s, the talker 1.5-6 m from a microphone mounted 3 m up, as a sensor on
    a station concourse or in a courtyard hears a voice; normalised to a direct path of 1."""
    import pyroomacoustics as pra  # type: ignore[import-untyped]

    dims = [rng.uniform(8, 14), rng.uniform(6, 10), rng.uniform(3.5, 6)]
    rt60 = rng.uniform(0.3, 0.9)
    absorption, order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SR, materials=pra.Material(absorption), max_order=min(order, 30))
    mic = np.array([rng.uniform(1, dims[0] - 1), 0.5, 3.0])
    dist = rng.uniform(1.5, 6.0)
    ang = rng.uniform(0.2, np.pi - 0.2)
    talker = mic + dist * np.array([np.cos(ang), np.sin(ang), 0.0])
    talker[:2] = np.clip(talker[:2], 0.5, np.array(dims[:2]) - 0.5)
    talker[2] = 1.6
    room.add_source(talker.tolist())
    room.add_microphone(mic.tolist())
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    return np.asarray(h / max(1e-9, float(np.max(np.abs(h)))), dtype=np.float32)


def _overlapped(a: list[F32], b: list[F32], n: int, rng: np.random.Generator) -> list[F32]:
    """``n`` clips of two talkers at once: one of ``a``, one of ``b`` 0.2-1.0 s later, at
    -6 to 0 dB re the first."""
    out: list[F32] = []
    for _ in range(n if a and b else 0):
        x, y = a[int(rng.integers(len(a)))], b[int(rng.integers(len(b)))]
        lag = int(rng.uniform(0.2, 1.0) * SR)
        m = np.zeros(max(x.size, lag + y.size), dtype=np.float64)
        m[: x.size] += x
        rx = float(np.sqrt(np.mean(x * x))) + 1e-9
        ry = float(np.sqrt(np.mean(y * y))) + 1e-9
        m[lag : lag + y.size] += y * (rx / ry) * 10 ** (rng.uniform(-6, 0) / 20)
        out.append(np.asarray(m * (0.5 / max(1e-9, float(np.max(np.abs(m))))), dtype=np.float32))
    return out


def _items(src: rs.Source, rng: np.random.Generator) -> tuple[list[F32], list[F32]]:
    """(single words, bursts) available from a source."""
    if src.kind == "overlap":
        wa, pa = _items(rs.BY_NAME[src.files[0]], rng)
        wb, pb = _items(rs.overlap_partner(src), rng)
        return _overlapped(wa, wb, 24, rng), _overlapped(pa or wa, pb or wb, 12, rng)
    clips = rs.clips(src)
    if src.kind in ("calls", "lookalike"):
        words = [c for c in clips if c.size <= 1.5 * SR] or clips
        return words, []
    words = [w for c in clips for w in rs.cut_words(c)]
    pieces: list[F32] = []
    for c in clips:
        if c.size <= 4 * SR:
            pieces.append(c)
        else:
            for a in range(0, c.size - int(1.5 * SR), 4 * SR):
                pieces.append(c[a : a + int(rng.uniform(1.5, 4.0) * SR)])
    return (words or pieces), pieces


def _layout(src: rs.Source, seg: int, rng: np.random.Generator) -> list[tuple[int, list[F32]]]:
    """(start sample, clips played back to back) for one segment."""
    words, pieces = _items(src, rng)
    out: list[tuple[int, list[F32]]] = []
    pos = int(rng.uniform(0.05, 0.3) * SR)
    end = SEGMENT_S * SR
    loud = (int(LOUD_AT_S * SR), int((LOUD_AT_S + LOUD_S) * SR)) if seg == 1 else None
    while pos < end:
        if rng.random() < 0.6 or not out:
            group = [words[int(rng.integers(len(words)))]]
        elif pieces and rng.random() < 0.5:
            group = [pieces[int(rng.integers(len(pieces)))]]
        else:
            group = [words[int(rng.integers(len(words)))] for _ in range(int(rng.integers(3, 6)))]
        length = sum(c.size for c in group) + int(0.3 * SR) * (len(group) - 1)
        if loud and pos + length > loud[0] and pos < loud[1]:
            pos = loud[1] + int(0.3 * SR)
            continue
        if pos + length > end:
            break
        out.append((pos, group))
        pos += length + int(rng.uniform(3.0, 8.0) * SR)
    return out


def build(src: rs.Source, snr_db: float, variant: str, salt: int = 0) -> list[Segment]:
    """The two segments of a stream (see the module docstring); ``salt`` != 0 gives
    other draws (other city sounds, words and times) for training sets."""
    base = _seed(src.name) + 7919 * salt
    rng = np.random.default_rng(base)
    segments: list[Segment] = []
    for seg in range(2):
        bed = _bed(base % 100_000 + seg).copy()
        if seg == 1:
            a = int(LOUD_AT_S * SR)
            bed[a : a + int(LOUD_S * SR)] += _loud(base % 1000)
        layout = _layout(src, seg, rng)
        rir = room(rng)
        if variant == "room":  # its own draws: dry and far stay as they were
            rir = shoebox(np.random.default_rng(base + 104_729 * (seg + 1)))
        track = np.zeros(bed.size)
        speech = np.zeros(bed.size // 160, dtype=np.bool_)
        look = np.zeros(SEGMENT_S, dtype=np.bool_)
        floor = 10 ** (FLOOR_DBFS / 20)
        for start, group in layout:
            gap = np.zeros(int(0.3 * SR), dtype=np.float32)
            clip = np.concatenate([x for c in group for x in (c, gap)][:-1]).astype(np.float64)
            if variant in ("far", "room"):
                from scipy.signal import fftconvolve

                clip = fftconvolve(clip, rir)[: clip.size + int(0.3 * SR)]
            clip = clip[: bed.size - start]
            mask = rs.speech_mask(clip)
            level = float(np.sqrt(np.mean(rs.frame_rms(clip)[mask] ** 2))) if mask.any() else 0.0
            if level <= 0:
                continue
            under = bed[start : start + clip.size]
            gain = max(float(np.sqrt(np.mean(under * under))), floor) * 10 ** (snr_db / 20) / level
            track[start : start + clip.size] += clip * gain
            if src.kind == "lookalike":
                look[start // SR : -(-(start + clip.size) // SR)] = True
                continue
            f0 = start // 160  # clips start on any sample: mark the frames they touch
            m = rs.speech_mask(track[f0 * 160 : (f0 * 160 + clip.size + 159) // 160 * 160])
            speech[f0 : f0 + m.size] |= m
        mix = bed + track
        peak = float(np.max(np.abs(mix)))
        if peak > 0.99:
            mix *= 0.99 / peak
        segments.append(Segment(mix.astype(np.float32), speech, look))
    return segments


GateFactory = Callable[[], object]


def run_cell(
    gate: object, src: rs.Source, snr_db: float, variant: str
) -> tuple[Cell, float, float]:
    """Gate one stream; (cell, audio s, gate CPU s)."""
    counts = np.zeros(6, dtype=np.int64)
    look_n = look_k = 0
    leaked: list[float] = []
    audio_s = cpu_s = 0.0
    for k, seg in enumerate(build(src, snr_db, variant)):
        t0 = time.process_time()
        kept: list[int] = []
        for i in range(0, seg.audio.size, BLOCK_SAMPLES):
            kept.extend(w.start_sample for w in gate.push(seg.audio[i : i + BLOCK_SAMPLES]))  # type: ignore[attr-defined]
        kept.extend(w.start_sample for w in gate.flush())  # type: ignore[attr-defined]
        cpu_s += time.process_time() - t0
        audio_s += seg.audio.size / SR
        mask = kept_frame_mask(kept, seg.speech.size)
        counts += np.array(score(seg.speech, mask), dtype=np.int64)
        win_kept = mask.reshape(-1, FRAMES_PER_WINDOW).all(axis=1)
        look_n += int(seg.lookalike.sum())
        look_k += int((seg.lookalike & win_kept).sum())
        per_win = (seg.speech & mask).reshape(-1, FRAMES_PER_WINDOW).sum(axis=1)
        leaked.extend(k * SEGMENT_S + float(w) for w in np.flatnonzero(per_win))
    cell = Cell(
        src.name, src.split, src.kind, snr_db, variant, tuple(int(v) for v in counts),
        look_n, look_k, tuple(leaked),
    )  # fmt: skip
    return cell, audio_s, cpu_s


@dataclass(frozen=True)
class RealRun:
    cells: tuple[Cell, ...]
    audio_s: float
    gate_cpu_s: float

    def worst(self, split: str | None = None) -> float:
        sel = [c for c in self.cells if (split is None or c.split == split)]
        return max((c.leakage for c in sel if c.kind != "lookalike"), default=0.0)

    def yield_at(self, snr_db: float, split: str | None = None) -> float:
        sel = [c for c in self.cells if c.snr_db == snr_db and (split is None or c.split == split)]
        den = sum(c.counts[2] for c in sel)
        return sum(c.counts[3] for c in sel) / den if den else 0.0

    def lookalike_kept(self) -> float:
        n = sum(c.lookalike_windows for c in self.cells)
        return sum(c.lookalike_kept for c in self.cells) / n if n else 0.0


def quick_sources() -> tuple[rs.Source, ...]:
    """A smoke-run subset: one word list and one read-speech voice of each split."""
    names = ("klettres-de", "codec2-hts", "klettres-it", "sphinx-librivox")
    return tuple(s for s in rs.SOURCES if s.name in names)


def run_real(
    make_gate: GateFactory,
    sources: Iterable[rs.Source] = rs.SOURCES,
    snrs_db: tuple[float, ...] = SNRS_DB,
    variants: tuple[str, ...] = VARIANTS,
) -> RealRun:
    rs.fetch()
    gate = make_gate()
    cells: list[Cell] = []
    audio_s = cpu_s = 0.0
    for src in sources:
        for variant in variants:
            for snr in snrs_db:
                cell, a, c = run_cell(gate, src, snr, variant)
                cells.append(cell)
                audio_s += a
                cpu_s += c
                if cell.counts[1]:
                    log.info(
                        "real %s %s %g dB: leakage %.4f (%d/%d) at %s s",
                        src.name, variant, snr, cell.leakage, cell.counts[1], cell.counts[0],
                        ",".join(f"{t:g}" for t in cell.leaked_events),
                    )  # fmt: skip
    return RealRun(tuple(cells), audio_s, cpu_s)


def results(run: RealRun) -> dict[str, float]:
    out = {
        "privacy.real_speech_max_leakage": run.worst(),
        "privacy.real_tuning_max_leakage": run.worst("tune"),
        "privacy.real_heldout_max_leakage": run.worst("held"),
        "privacy.real_yield_10db": run.yield_at(10.0),
        "privacy.real_lookalike_kept": run.lookalike_kept(),
        "privacy.real_audio_s": run.audio_s,
        "privacy.real_sources": float(len({c.source for c in run.cells})),
    }
    for split in ("tune", "held"):
        sel = [c for c in run.cells if c.split == split and c.kind != "lookalike"]
        den = sum(c.counts[0] for c in sel)
        out[f"privacy.real_{split}_leakage_pooled"] = (
            sum(c.counts[1] for c in sel) / den if den else 0.0
        )
    return out


def render_table(run: RealRun) -> str:
    """Markdown: one row per source, leakage (one value per variant, in ``VARIANTS`` order:
    dry / far / room) per SNR and yield at 10 dB."""
    snrs = sorted({c.snr_db for c in run.cells})
    by = {(c.source, c.snr_db, c.variant): c for c in run.cells}
    head = "| source | split | kind | " + " | ".join(f"{s:g} dB" for s in snrs) + " | yield 10 dB |"
    rows = [head, "|---|---|---|" + "---|" * (len(snrs) + 1)]
    for name in dict.fromkeys(c.source for c in run.cells):
        c0 = next(c for c in run.cells if c.source == name)
        vals = []
        for s in snrs:
            parts = [by[(name, s, v)] for v in VARIANTS if (name, s, v) in by]
            vals.append(" / ".join(f"{p.leakage:.4f}" for p in parts))
        ys = [by[(name, 10.0, v)] for v in VARIANTS if (name, 10.0, v) in by]
        y = sum(p.counts[3] for p in ys) / max(1, sum(p.counts[2] for p in ys))
        rows.append(f"| {name} | {c0.split} | {c0.kind} | " + " | ".join(vals) + f" | {y:.3f} |")
    return "\n".join(rows)
