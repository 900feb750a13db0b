"""Attack bench: can speech be heard again from what a device uploads?

Owns: reconstructing speech from each candidate representation
(``benchmarks.representations``) and scoring it, and a quick classifier per
representation so that privacy is weighed against what the upload is for.

Attacks, strongest kept per representation:
- ``pinv``: band energies -> linear power spectrum by the filterbank's pseudo-inverse
  (negative bins clipped), pooled frames held over their 10 ms frames, then 60
  iterations of Griffin-Lim (512-point FFT, 25 ms Hann, 10 ms hop: the features' STFT);
- ``learned``: a small MLP (torch, CPU) trained to predict the fine 64-band 10 ms log-mel (the replaced upload)
  from the representation (the pooled frame and its neighbours, and the position
  inside it), on speech the attacker has: espeak-ng sentences in 12 languages and the
  real recordings of the *tuning* split; then ``pinv`` + Griffin-Lim from that log-mel.
  Scored on the *held-out* real recordings only.

Scores: STOI and ESTOI (``pystoi``) of the reconstruction against the clean speech,
beside the floor of white noise of the same length; word error rate of the offline
recogniser ``pocketsphinx`` (its packaged US-English model) on the reconstruction,
against what it recognises on the clean recording (and, for the LibriVox clips,
against their published transcription).

Classifier check: the same small CNN trained for each representation on labelled
scene windows (``devstack.scene``, two 10-minute scenes, the bench's two-tone siren),
tested on a third; ``macro_f1_delta`` = macro-F1(candidate) - macro-F1(log-mel 64/10 ms),
mean over three seeds. Windows holding speech are left out (they are never uploaded).

Invariants: the attacker never sees held-out audio; everything is computed from the
1 s windows a device would upload (16 kHz, window grid from the recording's start);
torch is only used here (cloud/bench side).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks import real_speech as rs
from benchmarks.representations import BY_NAME, CANDIDATES, Representation
from fleet_protocol import features as F

log = logging.getLogger(__name__)
SR = 16_000
GL_ITERS = 60
UPLOAD = "third-120ms"  # what devices upload (fleet_protocol.features; ADR 0006)
BASELINE = "logmel64-10ms"  # what they uploaded before ADR 0006 revision 2
LOGMEL = BY_NAME[BASELINE]  # the learned attack's target: fine 10 ms log-mel
N_MEL = LOGMEL.n_bands
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


# ------------------------------------------------------------------ signal helpers


def windows_of(x: F32) -> F32:
    n = -(-x.size // SR)
    out = np.zeros(n * SR, dtype=np.float32)
    out[: x.size] = x
    return out.reshape(n, SR)


def _stft(x: F64) -> npt.NDArray[np.complex128]:
    win = np.hanning(F.WIN_LENGTH + 1)[:-1]
    n = 1 + max(0, (x.size - F.WIN_LENGTH) // F.HOP)
    idx = np.arange(F.WIN_LENGTH)[None, :] + F.HOP * np.arange(n)[:, None]
    return np.fft.rfft(x[idx] * win, n=F.N_FFT, axis=-1)


def _istft(spec: npt.NDArray[np.complex128], length: int) -> F64:
    win = np.hanning(F.WIN_LENGTH + 1)[:-1]
    frames = np.fft.irfft(spec, n=F.N_FFT, axis=-1)[:, : F.WIN_LENGTH] * win
    out = np.zeros(length)
    norm = np.zeros(length)
    for i, fr in enumerate(frames):
        a = i * F.HOP
        b = min(length, a + F.WIN_LENGTH)
        out[a:b] += fr[: b - a]
        norm[a:b] += win[: b - a] ** 2
    return out / np.maximum(norm, 1e-8)


def griffin_lim(mag: F64, length: int, rng: np.random.Generator) -> F64:
    """Magnitude ``(frames, 257)`` on the features' STFT grid -> waveform."""
    phase = np.exp(2j * np.pi * rng.random(mag.shape))
    x = _istft(mag * phase, length)
    for _ in range(GL_ITERS):
        spec = _stft(x)
        spec = spec[: mag.shape[0]]
        if spec.shape[0] < mag.shape[0]:
            spec = np.pad(spec, ((0, mag.shape[0] - spec.shape[0]), (0, 0)))
        x = _istft(mag * np.exp(1j * np.angle(spec)), length)
    return x


def energies_from(rep: Representation, feats: F32) -> F64:
    """Band energies per 10 ms frame ``(windows * 98, bands)`` from uploaded features,
    each pooled frame held over its ``pool`` frames (the tail repeats the last)."""
    e = np.exp(feats.astype(np.float64) * F.NORM_STD + F.NORM_MEAN) - F.LOG_OFFSET
    e = np.maximum(e, 0.0).transpose(0, 2, 1)  # (B, T, nb)
    held = np.repeat(e, rep.pool, axis=1)
    if held.shape[1] < F.N_STFT_FRAMES:
        held = np.concatenate(
            [held, np.repeat(held[:, -1:], F.N_STFT_FRAMES - held.shape[1], axis=1)], axis=1
        )
    return np.asarray(held.reshape(-1, held.shape[2]), dtype=np.float64)


def pinv_magnitude(fb: F32, energies: F64) -> F64:
    pinv = np.linalg.pinv(fb.astype(np.float64))  # (257, nb)
    power = np.maximum(energies @ pinv.T, 0.0)
    return np.asarray(np.sqrt(power), dtype=np.float64)


def reconstruct(mag_frames: F64, n_windows: int, rng: np.random.Generator) -> F64:
    """Frames are 98 per window on each window's own grid: each window is inverted
    on its own (as an attacker holding separate windows must) and the pieces joined."""
    out = np.zeros(n_windows * SR)
    per = mag_frames.reshape(n_windows, F.N_STFT_FRAMES, -1)
    for i in range(n_windows):
        out[i * SR : (i + 1) * SR] = griffin_lim(per[i], SR, rng)
    return out


# ------------------------------------------------------------------ scoring


def stoi_pair(clean: F32, degraded: F64) -> tuple[float, float]:
    from pystoi import stoi

    n = min(clean.size, degraded.size)
    return (
        float(stoi(clean[:n], degraded[:n], SR, extended=False)),
        float(stoi(clean[:n], degraded[:n], SR, extended=True)),
    )


def recognise(x: npt.NDArray[np.floating]) -> list[str]:
    from pocketsphinx import Decoder

    pcm = np.clip(np.asarray(x) / max(1e-9, float(np.max(np.abs(x)))) * 0.7, -1, 1)
    d = Decoder(samprate=SR, logfn="/dev/null")
    d.start_utt()
    d.process_raw((pcm * 32767).astype("<i2").tobytes(), full_utt=True)
    d.end_utt()
    hyp = d.hyp()
    return hyp.hypstr.split() if hyp is not None else []


def wer(ref: list[str], hyp: list[str]) -> float:
    if not ref:
        return 0.0 if not hyp else 1.0
    d = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
            prev, d[j] = d[j], cur
    return float(d[len(hyp)]) / len(ref)


# ------------------------------------------------------------------ material


def _librivox_truth(cache: Path) -> dict[str, list[str]]:
    path = cache / "pocketsphinx-testdata/usr/share/pocketsphinx/test/data/librivox/transcription"
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines()[:100]:
        words = line.replace("<s>", "").replace("</s>", "").split()
        if words and words[-1].startswith("("):
            out[words[-1].strip("()")] = words[:-1]
    return out


@dataclass(frozen=True)
class Utterance:
    name: str
    audio: F32
    truth: tuple[str, ...] | None


def held_out_speech(cache: Path = rs.CACHE) -> list[Utterance]:
    """Clean held-out English read speech (the attack's test set)."""
    truth = _librivox_truth(cache)
    out: list[Utterance] = []
    for src in rs.HELD_OUT:
        if src.kind not in ("sentences", "radio") or src.language != "en":
            continue
        for p in rs.source_files(src, cache):
            x = rs.load(p, src.raw_rate)
            t = truth.get(p.stem)
            out.append(Utterance(f"{src.name}/{p.stem}", x, tuple(t) if t else None))
    return out


def attacker_speech(cache: Path = rs.CACHE, espeak_dir: Path | None = None) -> list[F32]:
    """What the attacker trains on: espeak-ng sentences and the tuning recordings."""
    from devstack.scene import speech

    rng = np.random.default_rng(3)
    out = [c for src in rs.TUNING if src.kind != "lookalike" for c in rs.clips(src, cache)]
    for lang in ("en", "de", "fr", "es", "it", "nl", "pl", "pt", "sv", "cs", "el", "hu"):
        out.extend(speech.speech_clip(lang, rng, espeak_dir) for _ in range(6))
    return out


# ------------------------------------------------------------------ learned inversion


def _context(rep: Representation, feats: F32) -> F32:
    """Per 10 ms output frame: pooled frames t-1, t, t+1 and the position inside t."""
    b, _nb, t = feats.shape
    pad = np.concatenate([feats[:, :, :1], feats, feats[:, :, -1:]], axis=2)
    ctx = np.concatenate([pad[:, :, :-2], pad[:, :, 1:-1], pad[:, :, 2:]], axis=1)  # (b, 3nb, t)
    per = np.repeat(ctx.transpose(0, 2, 1), rep.pool, axis=1)  # (b, t*pool, 3nb)
    pos = np.tile(np.eye(rep.pool, dtype=np.float32), (t, 1))[None].repeat(b, axis=0)
    x = np.concatenate([per, pos], axis=2)
    if x.shape[1] < F.N_STFT_FRAMES:
        x = np.concatenate([x, np.repeat(x[:, -1:], F.N_STFT_FRAMES - x.shape[1], axis=1)], axis=1)
    return np.asarray(x.reshape(b * F.N_STFT_FRAMES, -1), dtype=np.float32)


def train_inverter(rep: Representation, speech: list[F32], seed: int = 0) -> object:
    import torch

    torch.manual_seed(seed)
    w = np.concatenate([windows_of(x) for x in speech])
    x = torch.from_numpy(_context(rep, rep(w)))
    y = torch.from_numpy(LOGMEL(w).transpose(0, 2, 1).reshape(-1, N_MEL).copy())
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, N_MEL),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _epoch in range(12):
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 256):
            j = perm[i : i + 256]
            loss = torch.nn.functional.mse_loss(net(x[j]), y[j])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    log.info("inverter %s: train mse %.3f", rep.name, float(loss))
    return net


def learned_energies(rep: Representation, net: object, feats: F32) -> F64:
    import torch

    with torch.no_grad():
        mel = net(torch.from_numpy(_context(rep, feats))).numpy()  # type: ignore[operator]
    e = np.exp(mel.astype(np.float64) * F.NORM_STD + F.NORM_MEAN) - F.LOG_OFFSET
    return np.asarray(np.maximum(e, 0.0), dtype=np.float64)


# ------------------------------------------------------------------ the bench


@dataclass(frozen=True)
class AttackScore:
    representation: str
    attack: str
    stoi: float
    estoi: float
    wer_vs_clean_asr: float
    wer_vs_truth: float


def attack_all(
    reps: tuple[Representation, ...] = CANDIDATES, learned: bool = True, quick: bool = False
) -> tuple[list[AttackScore], dict[str, float]]:
    """Every representation x attack on the held-out speech; plus reference scores
    (``quick``: the LibriVox clips only)."""
    rs.fetch()
    utts = held_out_speech()
    if quick:
        utts = [u for u in utts if u.truth]
    rng = np.random.default_rng(0)
    refs = {u.name: recognise(u.audio) for u in utts}
    floor = [stoi_pair(u.audio, rng.standard_normal(u.audio.size) * 0.1) for u in utts]
    clean_truth = [wer(list(u.truth), refs[u.name]) for u in utts if u.truth]
    base = {
        "white_noise_stoi": float(np.mean([f[0] for f in floor])),
        "white_noise_estoi": float(np.mean([f[1] for f in floor])),
        "clean_asr_wer_vs_truth": float(np.mean(clean_truth)) if clean_truth else float("nan"),
        "utterances": float(len(utts)),
        "seconds": float(sum(u.audio.size for u in utts) / SR),
    }
    train = attacker_speech() if learned else []
    scores: list[AttackScore] = []
    for rep in reps:
        net = train_inverter(rep, train) if learned and learned_for(rep) else None
        for attack in ("pinv", "learned") if net is not None else ("pinv",):
            s, e, w1, w2 = [], [], [], []
            for u in utts:
                w = windows_of(u.audio)
                feats = rep(w)
                if attack == "pinv":
                    energies = energies_from(rep, feats)
                    mag = pinv_magnitude(rep.filterbank(), energies)
                else:
                    mag = pinv_magnitude(LOGMEL.filterbank(), learned_energies(rep, net, feats))
                y = reconstruct(mag, w.shape[0], rng)[: u.audio.size]
                a, b = stoi_pair(u.audio, y)
                s.append(a)
                e.append(b)
                hyp = recognise(y)
                w1.append(wer(refs[u.name], hyp))
                if u.truth:
                    w2.append(wer(list(u.truth), hyp))
            sc = AttackScore(
                rep.name, attack, float(np.mean(s)), float(np.mean(e)),
                float(np.mean(w1)), float(np.mean(w2)) if w2 else float("nan"),
            )  # fmt: skip
            log.info("attack %s", sc)
            scores.append(sc)
    return scores, base


def _scene_windows(seeds: tuple[int, ...]) -> tuple[F32, list[str]]:
    from devstack.scene.stream import SceneSpec, render_scene

    xs: list[F32] = []
    labels: list[str] = []
    for seed in seeds:
        sc = render_scene(SceneSpec(seed=seed, duration_s=600, siren_pattern="hilo"))
        speechy = sc.speech_windows()
        w = sc.audio.reshape(-1, SR)
        for i, lab in enumerate(sc.window_labels):
            if not speechy[i]:
                xs.append(w[i])
                labels.append(lab)
    return np.stack(xs), labels


def macro_f1_by_representation(
    reps: tuple[Representation, ...] = CANDIDATES, seeds: tuple[int, ...] = (0, 1, 2)
) -> dict[str, float]:
    """Mean macro-F1 over ``seeds`` of the same small CNN on each representation."""
    import torch

    xtr, ytr_l = _scene_windows((42, 43))
    xte, yte_l = _scene_windows((44,))
    classes = sorted(set(ytr_l) | set(yte_l))
    ytr = torch.tensor([classes.index(c) for c in ytr_l])
    yte = np.array([classes.index(c) for c in yte_l])
    out: dict[str, float] = {}
    for rep in reps:
        ftr, fte = torch.from_numpy(rep(xtr))[:, None], torch.from_numpy(rep(xte))[:, None]
        f1s = []
        for seed in seeds:
            torch.manual_seed(seed)
            net = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten(),
                torch.nn.Linear(256, len(classes)),
            )  # fmt: skip
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            for _epoch in range(25):
                perm = torch.randperm(ftr.shape[0])
                for i in range(0, ftr.shape[0], 64):
                    j = perm[i : i + 64]
                    loss = torch.nn.functional.cross_entropy(net(ftr[j]), ytr[j])
                    opt.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
            with torch.no_grad():
                pred = net(fte).argmax(1).numpy()
            f1s.append(_macro_f1(yte, pred, len(classes)))
        out[rep.name] = float(np.mean(f1s))
        log.info("classifier %s: macro-F1 %.3f (%s)", rep.name, out[rep.name], f1s)
    return out


def _macro_f1(y: npt.NDArray[np.int64], p: npt.NDArray[np.int64], k: int) -> float:
    f1 = []
    for c in range(k):
        if not (y == c).any():
            continue
        tp = float(((p == c) & (y == c)).sum())
        prec = tp / max(1.0, float((p == c).sum()))
        rec = tp / float((y == c).sum())
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return float(np.mean(f1))


def learned_for(rep: Representation) -> bool:
    """The learned attack runs on the coarse candidates (where pinv is weakest)."""
    return rep.pool > 1


def run(
    reps: tuple[Representation, ...] = CANDIDATES, out: Path | None = None
) -> dict[str, object]:
    """Attack and classifier figures for every candidate; written as JSON to ``out``."""
    import json

    scores, base = attack_all(reps)
    f1 = macro_f1_by_representation(reps)
    result: dict[str, object] = {
        "base": base,
        "macro_f1": f1,
        "scores": [s.__dict__ for s in scores],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def best_attack(scores: list[AttackScore], representation: str) -> AttackScore:
    """The attack that leaves the most intelligible speech (highest STOI)."""
    return max((s for s in scores if s.representation == representation), key=lambda s: s.stoi)


def render_table(result: dict[str, object]) -> str:
    raw_scores: list[dict[str, object]] = result["scores"]  # type: ignore[assignment]
    scores = [AttackScore(**d) for d in raw_scores]  # type: ignore[arg-type]
    f1: dict[str, float] = result["macro_f1"]  # type: ignore[assignment]
    base: dict[str, float] = result["base"]  # type: ignore[assignment]
    ref = f1.get(BASELINE, float("nan"))
    rows = [
        "| representation | bytes/window | best attack | STOI | ESTOI | ASR WER (vs clean ASR) "
        "| WER vs transcript | macro-F1 | delta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from benchmarks.representations import BY_NAME

    for name in dict.fromkeys(s.representation for s in scores):
        b = best_attack(scores, name)
        worst_wer = min(s.wer_vs_clean_asr for s in scores if s.representation == name)
        rows.append(
            f"| {name} | {BY_NAME[name].bytes_per_window()} | {b.attack} | {b.stoi:.3f} | "
            f"{b.estoi:.3f} | {worst_wer:.3f} | {b.wer_vs_truth:.3f} | "
            f"{f1.get(name, float('nan')):.3f} | {f1.get(name, float('nan')) - ref:+.3f} |"
        )
    rows.append(
        f"| white noise (floor) | | | {base['white_noise_stoi']:.3f} | "
        f"{base['white_noise_estoi']:.3f} | 1 | 1 | | |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(out=rs.CACHE.parent / "attack" / "latest.json")
    print(render_table(res))
    sys.exit(0)
