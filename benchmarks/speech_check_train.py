"""Train the device's second speech detector (``edge_daemon.privacy.speech_check``).

Owns: the training set, the model, the export to ONNX and the model card. Cloud/bench
side (torch); the device only runs the exported ONNX.

Training data (never the held-out voices of ``benchmarks.real_speech``):
- scenes of ``devstack.scene`` with espeak-ng speech in its 20 EU languages, 25 % of the
  time at -5..25 dB SNR (seeds 9000+: apart from every bench seed);
- the *tuning* split of the real recordings, laid out as in ``benchmarks.privacy_real``
  but with other draws (``salt`` 1 and 2), dry and far-field, at 0/5/10/20 dB;
- non-speech: the same scenes' speech-free windows, speech-free scenes, and the
  instrument notes of the tuning split (harmonic sounds that are not speech).
A window is *speech* when it holds at least one ground-truth speech frame (10 ms).
Every window is also seen at a random level (-30..+6 dB), so the score does not hang
on absolute level (the features keep it).

Model: two 3x3 convolutions (16 channels) over the ``(20, 8)`` band-by-frame input,
mean and max over time per band, two linear layers, sigmoid; ~23k parameters,
~0.4 M multiply-adds per window.
The threshold is the highest score that still flags ``RECALL_TARGET`` of the speech
windows of the training set; the card records it with the miss and false-alarm rates.

    python -m benchmarks.speech_check_train        # writes edge_daemon/privacy/data/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks import privacy_real as pr
from benchmarks import real_speech as rs
from fleet_protocol.features import FEATURE_VERSION, N_BANDS, N_FRAMES, features_batch

log = logging.getLogger("benchmarks.speech_check_train")
SR = 16_000
OUT = Path(__file__).resolve().parent.parent / "edge_daemon" / "privacy" / "data"
RECALL_TARGET = 0.999
# The shipped threshold: at RECALL_TARGET the check alone would flag ~36% of the training
# set's speech-free windows (most of them next to speech in the dense real-speech
# streams); at 0.1 it misses 0.6% of speech windows on its own and flags 8.6%. It is the
# second line behind the VAD gate, so leakage is what both miss (BENCHMARKS.md).
DEFAULT_THRESHOLD = 0.1
ROC_POINTS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
F32 = npt.NDArray[np.float32]


def scene_windows(n_scenes: int, seconds: int = 120) -> tuple[F32, npt.NDArray[np.bool_]]:
    from devstack.scene.stream import SceneSpec, render_scene

    xs, ys = [], []
    for k in range(n_scenes):
        rate = 0.0 if k % 4 == 3 else 0.25
        sc = render_scene(
            SceneSpec(seed=9000 + k, duration_s=seconds, speech_rate=rate, speech_snr_db=(-5, 25))
        )
        xs.append(sc.audio.reshape(-1, SR))
        ys.append(sc.speech_frames.reshape(-1, 100).any(axis=1))
    return np.concatenate(xs), np.concatenate(ys)


def real_windows(salts: tuple[int, ...] = (1, 2)) -> tuple[F32, npt.NDArray[np.bool_]]:
    rs.fetch()
    xs, ys = [], []
    for src in rs.TUNING:
        for salt in salts:
            for variant in pr.VARIANTS:
                for snr in pr.SNRS_DB:
                    for seg in pr.build(src, snr, variant, salt=salt):
                        xs.append(seg.audio.reshape(-1, SR))
                        ys.append(seg.speech.reshape(-1, 100).any(axis=1))
    return np.concatenate(xs), np.concatenate(ys)


def features(x: F32, rng: np.random.Generator) -> F32:
    gains = 10 ** (rng.uniform(-30, 6, size=(x.shape[0], 1)) / 20)
    return features_batch(np.clip(x * gains, -1, 1).astype(np.float32))


def build_model() -> object:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
            )  # fmt: skip
            self.head = torch.nn.Sequential(
                torch.nn.Linear(2 * 16 * N_BANDS, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)  # (B, 16, bands, frames): pool over time only, keep the bands
            pooled = torch.cat([h.mean(dim=3), h.amax(dim=3)], dim=1).flatten(1)
            return torch.sigmoid(self.head(pooled))

    return Net()


def train(x: F32, y: npt.NDArray[np.bool_], epochs: int, seed: int = 0) -> object:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = build_model()
    xt = torch.from_numpy(x)[:, None]
    yt = torch.from_numpy(y.astype(np.float32))[:, None]
    pos = float(y.mean())
    weight = torch.where(yt > 0, 0.5 / max(pos, 1e-3), 0.5 / max(1 - pos, 1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        perm = torch.randperm(xt.shape[0])
        total = 0.0
        for i in range(0, xt.shape[0], 256):
            j = perm[i : i + 256]
            p = net(xt[j]).clamp(1e-6, 1 - 1e-6)  # type: ignore[operator]
            loss = torch.nn.functional.binary_cross_entropy(p, yt[j], weight=weight[j])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * j.numel()
        sched.step()
        log.info("epoch %d: loss %.4f", epoch, total / xt.shape[0])
    return net


def scores(net: object, x: F32) -> F32:
    import torch

    with torch.no_grad():
        return np.concatenate(
            [net(torch.from_numpy(x[i : i + 512])[:, None]).numpy().reshape(-1)  # type: ignore[operator]
             for i in range(0, x.shape[0], 512)]
        )  # fmt: skip


def export(net: object, out: Path, card: dict[str, object]) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, N_BANDS, N_FRAMES)
    tmp = out / "speech_check.onnx.tmp"
    torch.onnx.export(
        net,  # type: ignore[arg-type]
        (dummy,), str(tmp), input_names=["features"], output_names=["speech"],
        dynamic_axes={"features": {0: "batch"}, "speech": {0: "batch"}}, opset_version=17,
        dynamo=False,
    )  # fmt: skip
    tmp.replace(out / "speech_check.onnx")
    (out / "speech_check.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.speech_check_train")
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="the device's threshold (the card also records the RECALL_TARGET one)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = np.random.default_rng(0)
    cache = rs.CACHE.parent / f"speech-check-data-{FEATURE_VERSION}-{args.scenes}.npz"
    if cache.exists():  # the training windows' features, as built last time
        with np.load(cache) as z:
            f, yy, x_plain, y = z["f"], z["yy"], z["x_plain"], z["y"]
    else:
        xs, ys = scene_windows(args.scenes)
        xr, yr = real_windows()
        x = np.concatenate([xs, xr])
        y = np.concatenate([ys, yr])
        log.info(
            "windows: %d (%d speech); scenes %d, real %d", y.size, int(y.sum()), ys.size, yr.size
        )
        x_plain = np.concatenate(
            [features_batch(x[i : i + 1000]) for i in range(0, x.shape[0], 1000)]
        )
        x_level = np.concatenate(
            [features(x[i : i + 1000], rng) for i in range(0, x.shape[0], 1000)]
        )
        f = np.concatenate([x_level, x_plain])  # random level and as heard
        yy = np.concatenate([y, y])
        del x
        np.savez(cache, f=f, yy=yy, x_plain=x_plain, y=y)
    net = train(f, yy, args.epochs)
    s = scores(net, x_plain)
    thr = float(np.quantile(s[y], 1 - RECALL_TARGET))
    card = {
        "feature_version": FEATURE_VERSION,
        "threshold": args.threshold,
        "threshold_at_recall_target": thr,
        "train_roc": {
            f"{t:g}": {"miss": float((s[y] < t).mean()), "false_alarm": float((s[~y] >= t).mean())}
            for t in ROC_POINTS
        },
        "recall_target": RECALL_TARGET,
        "train_windows": int(y.size),
        "train_speech_windows": int(y.sum()),
        "train_miss_rate": float((s[y] < args.threshold).mean()),
        "train_false_alarm_rate": float((s[~y] >= args.threshold).mean()),
        "data": "devstack scenes (espeak-ng, 20 languages, seeds 9000+), real recordings of "
        "the tuning split (benchmarks.real_speech, salt 1), instrument notes; "
        "never the held-out split",
    }
    export(net, args.out, card)
    log.info("card: %s", card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
