"""Privacy benchmark: how much speech the gate lets through, and how much else it keeps.

Owns: the privacy section of ``make bench`` — scenes with espeak-ng speech in one
language each, mixed at fixed SNRs, pushed through the real gate (``PrivacyGate`` with
``GateConfig()`` defaults and Silero VAD), and scored against the clean speech track.

Invariants:
- one scene per (language, seed); the same seed at every SNR, so across SNRs the
  events, utterances and voices are identical and only the speech level differs
  (``render_scene`` draws the SNR uniformly from ``(snr, snr)``, the same draws);
- ground truth is the scene's ``speech_frames`` (10 ms frames, conservative: see
  ``devstack.scene.stream``); a frame is *kept* when a released window covers it;
- leakage = speech frames kept / speech frames; yield = non-speech frames kept /
  non-speech frames; window yield = speech-free 1 s windows kept / speech-free
  windows (the gate's own test measure: it leaves out the non-speech frames that
  share a window with speech, which no 1 s gate can keep); all counted over all
  scenes of a (language, SNR) cell;
- the gate is fed in 100 ms blocks, like a capture, and flushed at the scene end; a
  scene lasts 3 minutes, so that the windows the flush drops unvetted (the last
  ``margin_after_s``; a device streams for days between flushes) weigh little;
- nothing here writes audio anywhere except the espeak clip cache of ``devstack``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SNRS_DB: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0)
# Ten-plus EU languages from the scene generator's sentence bank (espeak-ng voices).
LANGUAGES: tuple[str, ...] = (
    "en", "de", "fr", "es", "it", "nl", "pl", "pt", "sv", "cs", "el", "hu",
)  # fmt: skip
QUICK_LANGUAGES: tuple[str, ...] = ("en", "de")
LANGUAGES_INDEX: dict[str, int] = {lang: i for i, lang in enumerate(LANGUAGES)}
FRAMES_PER_WINDOW = 100  # 10 ms frames in a 1 s gate window
FRAME_SAMPLES = 160
BLOCK_SAMPLES = 1600  # 100 ms capture blocks
SPEECH_RATE = 0.10  # share of scene time covered by utterances (as the bench scene)
BASE_SEED = 7000


@dataclass(frozen=True)
class Cell:
    """Counts for one (language, SNR) cell, summed over its scenes."""

    language: str
    snr_db: float
    speech_frames: int
    speech_frames_kept: int
    other_frames: int
    other_frames_kept: int
    free_windows: int
    free_windows_kept: int

    @property
    def leakage(self) -> float:
        return self.speech_frames_kept / self.speech_frames if self.speech_frames else 0.0

    @property
    def yield_(self) -> float:
        return self.other_frames_kept / self.other_frames if self.other_frames else 0.0


@dataclass(frozen=True)
class PrivacyRun:
    cells: tuple[Cell, ...]
    audio_s: float
    gate_s: float

    def leakage_at(self, snr_db: float) -> float:
        return _ratio(self.cells, snr_db, speech=True)

    def yield_at(self, snr_db: float) -> float:
        return _ratio(self.cells, snr_db, speech=False)

    def window_yield_at(self, snr_db: float) -> float:
        sel = [c for c in self.cells if c.snr_db == snr_db]
        den = sum(c.free_windows for c in sel)
        return sum(c.free_windows_kept for c in sel) / den if den else 0.0


def _ratio(cells: tuple[Cell, ...], snr_db: float, *, speech: bool) -> float:
    sel = [c for c in cells if c.snr_db == snr_db]
    if speech:
        num, den = sum(c.speech_frames_kept for c in sel), sum(c.speech_frames for c in sel)
    else:
        num, den = sum(c.other_frames_kept for c in sel), sum(c.other_frames for c in sel)
    return num / den if den else 0.0


def kept_frame_mask(kept_starts: list[int], n_frames: int) -> np.ndarray:
    """True for every 10 ms frame inside a released 1 s window (given by start sample)."""
    mask = np.zeros(n_frames, dtype=np.bool_)
    for start in kept_starts:
        f = start // FRAME_SAMPLES
        mask[f : f + FRAMES_PER_WINDOW] = True
    return mask


def score(speech_frames: np.ndarray, kept: np.ndarray) -> tuple[int, ...]:
    """(speech frames, speech kept, other frames, other kept, speech-free windows,
    speech-free windows kept) for one scene; masks are per 10 ms frame."""
    s = np.asarray(speech_frames, dtype=np.bool_)
    k = np.asarray(kept, dtype=np.bool_)
    if s.shape != k.shape or s.size % FRAMES_PER_WINDOW:
        raise ValueError(
            f"frame masks differ in shape or are not whole windows: {s.shape}, {k.shape}"
        )
    free = ~s.reshape(-1, FRAMES_PER_WINDOW).any(axis=1)
    kw = k.reshape(-1, FRAMES_PER_WINDOW).all(axis=1)
    return (
        int(s.sum()), int((s & k).sum()), int((~s).sum()), int((~s & k).sum()),
        int(free.sum()), int((free & kw).sum()),
    )  # fmt: skip


def run_privacy(
    languages: tuple[str, ...] = LANGUAGES,
    snrs_db: tuple[float, ...] = SNRS_DB,
    scene_s: int = 180,
    scenes_per_language: int = 1,
    cache_dir: Path | None = None,
) -> PrivacyRun:
    """Render, gate and score every (language, SNR, scene); see the module invariants."""
    from devstack.scene.stream import SceneSpec, iter_blocks, render_scene
    from edge_daemon.privacy.gate import GateConfig, PrivacyGate
    from edge_daemon.privacy.vad import SileroVad

    gate = PrivacyGate(GateConfig(), SileroVad(threads=1))
    cells: list[Cell] = []
    audio_s = gate_s = 0.0
    for lang in languages:
        for snr in snrs_db:
            totals = np.zeros(6, dtype=np.int64)
            for k in range(scenes_per_language):
                spec = SceneSpec(
                    seed=BASE_SEED + 1000 * LANGUAGES_INDEX.get(lang, 99) + k,
                    duration_s=scene_s,
                    speech_rate=SPEECH_RATE,
                    speech_snr_db=(snr, snr),
                    languages=(lang,),
                )
                scene = render_scene(spec, cache_dir)
                t0 = time.perf_counter()
                kept: list[int] = []
                for block in iter_blocks(scene, BLOCK_SAMPLES):
                    kept.extend(w.start_sample for w in gate.push(block))
                kept.extend(w.start_sample for w in gate.flush())
                gate_s += time.perf_counter() - t0
                audio_s += scene.audio.size / 16_000
                mask = kept_frame_mask(kept, scene.speech_frames.size)
                totals += np.array(score(scene.speech_frames, mask), dtype=np.int64)
            cell = Cell(lang, snr, *(int(v) for v in totals))
            log.info(
                "privacy %s @ %g dB: leakage %.4f (%d/%d frames), yield %.3f",
                lang,
                snr,
                cell.leakage,
                cell.speech_frames_kept,
                cell.speech_frames,
                cell.yield_,
            )
            cells.append(cell)
    return PrivacyRun(tuple(cells), audio_s, gate_s)


def results(run: PrivacyRun) -> dict[str, float]:
    """The flat keys for ``benchmarks/results/latest.json``."""
    langs = sorted({c.language for c in run.cells})
    out: dict[str, float] = {
        "privacy.max_leakage": max(c.leakage for c in run.cells),
        "privacy.yield_10db": run.yield_at(10.0),
        "privacy.window_yield_10db": run.window_yield_at(10.0),
        "privacy.languages": float(len(langs)),
        "privacy.audio_s": run.audio_s,
        "privacy.gate_rtf": run.gate_s / run.audio_s if run.audio_s else 0.0,
    }
    for snr in sorted({c.snr_db for c in run.cells}):
        tag = f"{snr:g}db"
        out[f"privacy.leakage_{tag}"] = run.leakage_at(snr)
        if tag != "10db":
            out[f"privacy.yield_{tag}"] = run.yield_at(snr)
    return out


def render_table(run: PrivacyRun) -> str:
    """Markdown: one row per language, leakage / yield per SNR."""
    snrs = sorted({c.snr_db for c in run.cells})
    by = {(c.language, c.snr_db): c for c in run.cells}
    head = "| language | " + " | ".join(f"{s:g} dB: leakage / yield" for s in snrs) + " |"
    rows = [head, "|---|" + "---|" * len(snrs)]
    for lang in sorted({c.language for c in run.cells}):
        vals = [by[(lang, s)] for s in snrs]
        rows.append(
            f"| {lang} | " + " | ".join(f"{c.leakage:.4f} / {c.yield_:.3f}" for c in vals) + " |"
        )
    rows.append(
        "| **all** | "
        + " | ".join(f"{run.leakage_at(s):.4f} / {run.yield_at(s):.3f}" for s in snrs)
        + " |"
    )
    rows.append(
        "| window yield, all | " + " | ".join(f"{run.window_yield_at(s):.3f}" for s in snrs) + " |"
    )
    return "\n".join(rows)
