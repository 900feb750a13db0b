"""Augmented training windows for the device's speech check (``benchmarks.speech_check_train``).

Owns: drawing 1 s windows that cover the failure modes the privacy bench found in
the gate (ADR 0005, revision 4): speech through reverberant rooms and far-field
distances, single short words and syllables after silence or noise, words cut by a
window edge, radio and public-address voices, at -5..25 dB SNR over varied city
sound, and the non-speech lookalikes (instrument notes) beside them.

Sources (never the held-out voices of ``benchmarks.real_speech``):
- the words, calls and read-speech pieces of the *tuning* split (``real_speech.TUNING``),
  cut as ``benchmarks.privacy_real`` cuts them;
- espeak-ng utterances of ``devstack.scene.speech`` (synthetic voices, 20 languages),
  whole and cut into words;
- city sound: ``devstack.scene`` speech-free scenes (seeds ``BED_SEED``+, apart from
  every bench seed) and long loud construction noise;
- rooms: pyroomacoustics image-method shoeboxes (RT60 0.3-2 s, talker 1-12 m from the
  microphone) and exponential-tail responses (RT60 0.3-2 s, direct-to-reverberant
  ratio -12..+6 dB).

Invariants:
- a draw is a pure function of its seed;
- a window is labelled with its ground-truth speech frames as the bench counts them
  (``real_speech.speech_mask`` of the clip as mixed, reverberant tail included): the
  trainer weighs a speech window by how many frames it would leak;
- instrument notes are non-speech (label 0); radio and PA voices are speech (label 1);
- speech level is ``snr`` above the RMS of the city sound under the clip (floor
  -50 dBFS), as in the bench.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from benchmarks import privacy_real as pr
from benchmarks import real_speech as rs

log = logging.getLogger(__name__)
SR = 16_000
CTX = 3 * SR  # a window is cut from the middle of 3 s of context
BED_SEED = 52_000
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Banks:
    """What windows are drawn from (built once by ``banks``)."""

    words: tuple[F32, ...]  # single words, calls, syllables
    pieces: tuple[F32, ...]  # read-speech pieces 1.5-4 s
    radio: tuple[F32, ...]  # speech through a radio (already band-limited)
    lookalike: tuple[F32, ...]  # instrument notes: not speech
    beds: tuple[F64, ...]  # city sound, 60 s each
    rirs: tuple[F32, ...]  # room responses, direct path first


def hall(rng: np.random.Generator) -> F32:
    """A pyroomacoustics shoebox response: RT60 0.3-2 s, talker 1-12 m away."""
    import pyroomacoustics as pra  # type: ignore[import-untyped]

    rt60 = float(rng.uniform(0.3, 2.0))
    scale = max(1.0, rt60 / 0.7)
    dims = [rng.uniform(8, 16) * scale, rng.uniform(6, 12) * scale, rng.uniform(3.5, 8)]
    absorption, order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SR, materials=pra.Material(absorption), max_order=min(order, 40))
    mic = np.array([rng.uniform(1, dims[0] - 1), rng.uniform(0.5, 2.0), 0.0])
    mic[2] = min(rng.uniform(2.5, 4.0), dims[2] - 0.5)
    dist = rng.uniform(1.0, 12.0)
    ang = rng.uniform(0.15, np.pi - 0.15)
    talker = mic + dist * np.array([np.cos(ang), np.sin(ang), 0.0])
    talker[:2] = np.clip(talker[:2], 0.5, np.array(dims[:2]) - 0.5)
    talker[2] = rng.uniform(1.1, 1.8)
    room.add_source(talker.tolist())
    room.add_microphone(mic.tolist())
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)[: int(2.5 * SR)]
    return np.asarray(h / max(1e-9, float(np.max(np.abs(h)))), dtype=np.float32)


def banks(n_rirs: int = 96, n_beds: int = 16, n_espeak: int = 80, seed: int = 0) -> Banks:
    from devstack.scene import sounds, speech
    from devstack.scene.stream import SceneSpec, render_scene

    rs.fetch()
    rng = np.random.default_rng(seed)
    words: list[F32] = []
    pieces: list[F32] = []
    radio: list[F32] = []
    look: list[F32] = []
    for src in rs.TUNING:
        if src.split != "tune":  # the split is the rule; checked again here
            raise AssertionError(src.name)
        w, p = pr._items(src, rng)
        if src.kind == "lookalike":
            look.extend(w)
        elif src.kind == "radio":
            radio.extend(w + p)
        else:
            words.extend(w)
            pieces.extend(p)
    for k in range(n_espeak):
        lang = speech.LANGUAGES[k % len(speech.LANGUAGES)]
        clip = np.asarray(speech.speech_clip(lang, rng), dtype=np.float32)
        pieces.append(clip[: int(4 * SR)])
        words.extend(rs.cut_words(clip)[:4])
    beds: list[F64] = []
    for k in range(n_beds):
        scene = render_scene(SceneSpec(seed=BED_SEED + k, duration_s=60, speech_rate=0.0))
        x = np.asarray(scene.audio, dtype=np.float64)
        if k % 4 == 3:  # long loud construction noise over a quarter of the beds
            loud = np.asarray(sounds.synthesize("construction", x.size, rng), dtype=np.float64)
            x = x + loud * (10 ** (rng.uniform(-25, -12) / 20) / (np.std(loud) + 1e-12))
        beds.append(x)
    rirs = [
        hall(rng) if k % 2 else pr.room(rng, rt60=rng.uniform(0.3, 2.0), drr_db=rng.uniform(-12, 6))
        for k in range(n_rirs)
    ]
    log.info(
        "banks: %d words, %d pieces, %d radio, %d lookalike, %d beds, %d rooms",
        len(words), len(pieces), len(radio), len(look), len(beds), len(rirs),
    )  # fmt: skip
    return Banks(tuple(words), tuple(pieces), tuple(radio), tuple(look), tuple(beds), tuple(rirs))


def _pa(x: F64, rng: np.random.Generator) -> F64:
    """A public-address or phone voice: 300-3400 Hz, soft-clipped."""
    from scipy.signal import butter, sosfilt

    sos = butter(
        4, [rng.uniform(200, 400), rng.uniform(3000, 4500)], "bandpass", fs=SR, output="sos"
    )
    y = sosfilt(sos, x)
    drive = rng.uniform(1.0, 6.0)
    return np.asarray(np.tanh(drive * y / (np.max(np.abs(y)) + 1e-9)), dtype=np.float64)


def _group(b: Banks, rng: np.random.Generator) -> tuple[F64, str]:
    u = rng.random()
    if u < 0.45:
        kind, parts = "word", [b.words[int(rng.integers(len(b.words)))]]
    elif u < 0.6:
        kind = "burst"
        parts = [b.words[int(rng.integers(len(b.words)))] for _ in range(int(rng.integers(2, 5)))]
    elif u < 0.88:
        kind, parts = "piece", [b.pieces[int(rng.integers(len(b.pieces)))]]
    else:
        kind, parts = "radio", [b.radio[int(rng.integers(len(b.radio)))]]
    gap = np.zeros(int(rng.uniform(0.1, 0.4) * SR))
    clip = np.concatenate([x for c in parts for x in (np.asarray(c, np.float64), gap)][:-1])
    return clip, kind


def draw(b: Banks, n: int, seed: int) -> tuple[F32, npt.NDArray[np.int16], list[str]]:
    """``n`` windows: audio ``(n, SR)``, ground-truth speech frames per window (0..100),
    and what each holds (``word``, ``burst``, ``piece``, ``radio``, ``pa``,
    ``lookalike``, ``none``; ``+room`` when reverberated)."""
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(seed)
    out = np.zeros((n, SR), dtype=np.float32)
    frames = np.zeros(n, dtype=np.int16)
    kinds: list[str] = []
    for i in range(n):
        bed_src = b.beds[int(rng.integers(len(b.beds)))]
        a = int(rng.integers(0, bed_src.size - CTX))
        bed = bed_src[a : a + CTX].copy()
        u = rng.random()
        if u < 0.22:
            kinds.append("none")
            mix = bed
        else:
            if u < 0.32:
                clip, kind = (
                    np.asarray(b.lookalike[int(rng.integers(len(b.lookalike)))], np.float64),
                    "lookalike",
                )
            else:
                clip, kind = _group(b, rng)
                if kind != "radio" and rng.random() < 0.1:
                    clip, kind = _pa(clip, rng), "pa"
            if rng.random() < 0.6:
                clip = fftconvolve(clip, b.rirs[int(rng.integers(len(b.rirs)))])
                kind += "+room"
            # the clip overlaps the middle second anywhere: whole, or cut by an edge
            lo = SR - clip.size + int(0.03 * SR)
            start = int(rng.integers(max(0, lo), 2 * SR - int(0.03 * SR)))
            clip = clip[: CTX - start]
            mask = rs.speech_mask(clip)
            level = float(np.sqrt(np.mean(rs.frame_rms(clip)[mask] ** 2))) if mask.any() else 0.0
            if level <= 0:
                kinds.append("none")
                mix = bed
            else:
                under = bed[start : start + clip.size]
                floor = 10 ** (pr.FLOOR_DBFS / 20)
                snr = rng.uniform(-5, 25)
                gain = max(float(np.sqrt(np.mean(under * under))), floor) * 10 ** (snr / 20) / level
                track = np.zeros(CTX)
                track[start : start + clip.size] = clip * gain
                mix = bed + track
                kinds.append(kind)
                if kind.split("+")[0] != "lookalike":
                    f0 = start // 160
                    m = rs.speech_mask(track[f0 * 160 : (f0 * 160 + clip.size + 159) // 160 * 160])
                    sp = np.zeros(CTX // 160, dtype=np.bool_)
                    sp[f0 : f0 + m.size] = m[: sp.size - f0]
                    frames[i] = int(sp[100:200].sum())
        win = mix[SR : 2 * SR] * 10 ** (rng.uniform(-20, 6) / 20 if rng.random() < 0.5 else 0.0)
        peak = float(np.max(np.abs(win)))
        if peak > 0.99:
            win *= 0.99 / peak
        out[i] = win
    return out, frames, kinds
