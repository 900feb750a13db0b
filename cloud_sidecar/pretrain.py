"""Pretraining the base model: a dataset on disk → AudioCNN → ONNX fp32 → int8, with a card.

Owns the base-model directory layout (``base.pt``, ``base.fp32.onnx``, ``base.int8.onnx``,
``base.calib.npy``, ``base.fp32.tflite``, ``golden.npz``, ``replay.npz``, ``dataset-manifest.csv``,
``model_card.json``) and ``BaseModel``, its typed handle. The data comes only from the
dataset directory given to ``pretrain`` (``cloud-sidecar pretrain --dataset DIR``), read
by ``cloud_sidecar.audio_dataset`` (folder per class, ESC-50, UrbanSound8K or a generic
CSV; ``docs/datasets.md``); there is no built-in data. Invariants:

- every file is written atomically and its sha256 is in the card; ``load_base_model``
  refuses a directory whose files do not match their card;
- the ONNX graph has input ``features`` ``(batch, 20, 8)`` float32 and output ``probs``,
  a dynamic batch axis, opset 17, and one initializer ``<layer>.weight`` per adaptable
  layer (checked here, relied on by the edge adapter);
- the int8 model comes from ``fleet_model.quantize_model`` (static QDQ),
  the very function a device runs after merging an adapter, calibrated on the same
  ``base.calib.npy``: ``CALIBRATION_PER_CLASS`` training windows of each class of the
  dataset (spread over its level, the loudest first), shipped with the base, and named
  by sha256 both in the card and in the fp32 model's metadata; so both sides quantize
  identically;
- ``golden.npz`` (held-out windows, at most ``GOLDEN_MAX_PER_CLASS`` per class) and
  ``replay.npz`` (training windows, at most ``REPLAY_MAX_PER_CLASS`` per class) freeze
  the base distribution for every later training run: the gate's golden set and the
  replay mixed into LoRA training (``load_reference_sets``); arrays ``x`` float32
  ``(N, 20, 8)`` and ``y`` int64, stored without pickle;
- the card records the dataset: layout, path, the sha256 of its manifest (audio bytes,
  label and split of every file used; the manifest itself is ``dataset-manifest.csv``),
  windows per class and what was skipped;
- ``base.fp32.tflite`` (what LiteRT devices run and patch adapters into) is converted
  from ``base.fp32.onnx`` by ``cloud_sidecar.export_tflite`` (TensorFlow, in a child
  process, cloud only);
- the same dataset and seed give the same model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from cloud_sidecar.audio_dataset import DatasetConfig, Layout, LoadedDataset, load_dataset
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.export_tflite import export_tflite
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN, n_parameters
from fleet_model import (
    QUANT_LAYERS,
    RECIPE,
    ModelError,
    calibration_path,
    encode_calibration,
    quantize_model,
    set_calibration_sha,
)
from fleet_model.tflite_patch import tflite_path
from fleet_protocol.features import FEATURE_VERSION, N_BANDS, N_FRAMES
from fleet_protocol.io.files import file_sha256, write_atomic
from fleet_protocol.labels import CLASSES, LABELS_VERSION

log = logging.getLogger(__name__)

OPSET = 17
# One intra-op thread: on a shared 2-core box two OpenMP threads spin at every barrier
# while the other process holds a core; measured 10x slower per batch than one thread.
TRAIN_THREADS = 1
BATCH = 64
MAX_EPOCHS = 200
MAX_CARD_BYTES = 1024 * 1024
CALIBRATION_PER_CLASS = 3
GOLDEN_MAX_PER_CLASS = 100
REPLAY_MAX_PER_CLASS = 100
MAX_REFERENCE_WINDOWS = 20_000  # per .npz file: 20k x 25 KiB = 490 MiB at most
STATE_FILE, FP32_FILE, INT8_FILE, CARD_FILE = (
    "base.pt",
    "base.fp32.onnx",
    "base.int8.onnx",
    "model_card.json",
)
CALIB_FILE = calibration_path(Path(FP32_FILE)).name  # base.calib.npy, where devices look
TFLITE_FILE = tflite_path(Path(FP32_FILE)).name  # base.fp32.tflite, where LiteRT looks
GOLDEN_FILE, REPLAY_FILE, MANIFEST_FILE = "golden.npz", "replay.npz", "dataset-manifest.csv"
CHECKED_FILES = (
    STATE_FILE,
    FP32_FILE,
    INT8_FILE,
    CALIB_FILE,
    TFLITE_FILE,
    GOLDEN_FILE,
    REPLAY_FILE,
    MANIFEST_FILE,
)
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class BaseModel:
    dir: Path
    state_dict: Path
    onnx_fp32: Path
    onnx_int8: Path
    card: Path
    sha256_fp32: str
    calibration: Path
    golden: Path
    replay: Path


def fit(
    model: AudioCNN,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    epochs: int,
    lr: float,
    seed: int,
    weight_decay: float = 1e-4,
    class_balanced: bool = False,
) -> float:
    """Minibatch AdamW with a one-cycle schedule on ``model.logits``; returns the last loss.

    ``class_balanced`` weights the loss by inverse class frequency, so a skewed set (a
    device that mostly hears one new pattern) does not drag the other boundaries along.
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * ((len(x) + BATCH - 1) // BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    weight = None
    if class_balanced:
        counts = torch.bincount(yt, minlength=int(yt.max()) + 1).float()
        weight = torch.where(
            counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0
        )
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            logits = model.logits(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
    model.eval()
    return float(loss.detach())


def _onnx_predict(path: Path, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"features": x})
    labels: npt.NDArray[np.int64] = np.asarray(probs).argmax(axis=1)
    return labels


def calibration_windows(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], per_class: int = CALIBRATION_PER_CLASS
) -> npt.NDArray[np.float32]:
    """``per_class`` windows of each class present, in class order, spread over the
    class's level (mean feature): the loudest, then evenly down to the quietest.

    Activation ranges come from these windows' maxima, so the loudest of each class
    must be among them: with clips at gains 36 dB apart, the first three windows left
    louder ones clipped in int8 (top-1 agreement with fp32 fell to 0.985).
    """
    picks = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(y == c)
        if not len(idx):
            continue
        by_level = idx[np.argsort(-x[idx].mean(axis=(1, 2)), kind="stable")]
        spots = np.unique(np.linspace(0, len(by_level) - 1, min(per_class, len(by_level))).round())
        picks.append(by_level[spots.astype(np.intp)])
    return x[np.concatenate(picks)]


def export_onnx(model: AudioCNN, path: Path, *, calibration_sha256: str) -> str:
    """Export ``model`` to ONNX fp32 at ``path`` (atomically); return its sha256.

    The model's metadata names the calibration set its int8 form is quantized with.
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / "export.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not gone
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.zeros(1, N_BANDS, N_FRAMES),),
                tmp_path,
                input_names=["features"],
                output_names=["probs"],
                dynamic_axes={"features": {0: "batch"}, "probs": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        data = tmp_path.read_bytes()
    proto = onnx.load_from_string(data)
    names = {t.name for t in proto.graph.initializer}
    missing = [f"{layer}.weight" for layer in ADAPTABLE_LAYERS if f"{layer}.weight" not in names]
    if missing:
        raise TrainingError(f"ONNX export lost the initializer names {missing}")
    set_calibration_sha(proto, calibration_sha256)
    write_atomic(path, proto.SerializeToString(), 0o644)
    return file_sha256(path)


def quantize_file(fp32: Path, out: Path, *, calibration: Path) -> Path:
    """``fleet_model.quantize_model`` on files; ``TrainingError`` if the recipe refuses."""
    try:
        data = quantize_model(onnx.load(str(fp32)), calibration.read_bytes())
    except OSError as exc:
        raise TrainingError(f"cannot read the model or calibration set: {exc}") from exc
    except ModelError as exc:
        raise TrainingError(f"int8 quantization of {fp32} failed: {exc}") from exc
    write_atomic(out, data, 0o644)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    out_dir: Path,
    dataset: Path | None,
    *,
    layout: Layout = "auto",
    class_map: Path | None = None,
    dataset_config: DatasetConfig | None = None,
    seed: int = 0,
    epochs: int = 6,
    threads: int = TRAIN_THREADS,
) -> BaseModel:
    """Train the base CNN on the dataset at ``dataset`` and write the base-model directory.

    ``dataset`` is required: there is no built-in data (the synthetic city is one
    dataset, written by ``devstack write-dataset``).
    """
    if dataset is None:
        raise TrainingError(
            "pretrain needs a dataset: --dataset DIR (a folder per class, or an ESC-50,"
            " UrbanSound8K or path,label CSV layout; docs/datasets.md). For the synthetic"
            " city: devstack write-dataset --out DIR"
        )
    if not 1 <= epochs <= MAX_EPOCHS:
        raise TrainingError(f"epochs must be in 1..{MAX_EPOCHS}, got {epochs}")
    t0 = time.monotonic()
    data = load_dataset(dataset, layout, class_map, dataset_config)
    with torch_threads(threads):
        return _pretrain(out_dir, data, seed, epochs, t0)


def _first_per_class(y: I64, n: int) -> npt.NDArray[np.intp]:
    """Indices of the first ``n`` windows of each class, in their order in ``y``."""
    picks = [np.flatnonzero(y == c)[:n] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(picks))


def _npz_bytes(x: F32, y: I64) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x.astype(np.float32, copy=False), y=y.astype(np.int64, copy=False))
    return buf.getvalue()


def _pretrain(out_dir: Path, data: LoadedDataset, seed: int, epochs: int, t0: float) -> BaseModel:
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.flatnonzero(~data.held_out))  # shuffled: calibration, replay
    held = rng.permutation(np.flatnonzero(data.held_out))
    x_tr, y_tr, x_ho, y_ho = data.x[train], data.y[train], data.x[held], data.y[held]
    t_data = time.monotonic() - t0
    torch.manual_seed(seed)
    model = AudioCNN(len(CLASSES))
    loss = fit(model, x_tr, y_tr, epochs=epochs, lr=4e-3, seed=seed)
    with torch.no_grad():
        acc_fp32_torch = float((model(torch.from_numpy(x_ho)).argmax(1).numpy() == y_ho).mean())
    train_s = time.monotonic() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_atomic(state_path, buf.getvalue(), 0o644)
    calib = out_dir / CALIB_FILE
    calib_x = calibration_windows(x_tr, y_tr)
    write_atomic(calib, encode_calibration(calib_x), 0o644)
    fp32 = out_dir / FP32_FILE
    sha_fp32 = export_onnx(model, fp32, calibration_sha256=file_sha256(calib))
    int8 = quantize_file(fp32, out_dir / INT8_FILE, calibration=calib)
    export_tflite(fp32)  # LiteRT devices' base, in a child process (ADR 0011)
    p_fp32, p_int8 = _onnx_predict(fp32, x_ho), _onnx_predict(int8, x_ho)
    acc_fp32, acc_int8 = float((p_fp32 == y_ho).mean()), float((p_int8 == y_ho).mean())
    gold = _first_per_class(y_ho, GOLDEN_MAX_PER_CLASS)
    replay = _first_per_class(y_tr, REPLAY_MAX_PER_CLASS)
    golden_path, replay_path = out_dir / GOLDEN_FILE, out_dir / REPLAY_FILE
    write_atomic(golden_path, _npz_bytes(x_ho[gold], y_ho[gold]), 0o644)
    write_atomic(replay_path, _npz_bytes(x_tr[replay], y_tr[replay]), 0o644)
    write_atomic(out_dir / MANIFEST_FILE, data.manifest, 0o644)
    card = {
        "model": "AudioCNN",
        "n_parameters": n_parameters(model),
        "classes": list(CLASSES),
        "labels_version": LABELS_VERSION,
        "feature_version": FEATURE_VERSION,
        "input": {"name": "features", "shape": ["batch", N_BANDS, N_FRAMES], "dtype": "float32"},
        "output": {"name": "probs", "shape": ["batch", len(CLASSES)]},
        "adaptable_layers": {layer: f"{layer}.weight" for layer in ADAPTABLE_LAYERS},
        "dataset": {**data.summary, "manifest_file": MANIFEST_FILE},
        "training": {
            "seed": seed,
            "epochs": epochs,
            "train_windows": len(y_tr),
            "final_loss": round(loss, 4),
            "data_seconds": round(t_data, 1),
            "training_seconds": round(train_s, 1),
            "torch": torch.__version__,
        },
        "held_out": {
            "n": len(y_ho),
            "accuracy_torch": round(acc_fp32_torch, 4),
            "accuracy_fp32": round(acc_fp32, 4),
            "accuracy_int8": round(acc_int8, 4),
            "int8_fp32_agreement": round(float((p_fp32 == p_int8).mean()), 4),
        },
        "reference_sets": {
            "golden": {
                "file": GOLDEN_FILE,
                "windows": len(gold),
                "source": f"held-out windows, at most {GOLDEN_MAX_PER_CLASS} per class",
            },
            "replay": {
                "file": REPLAY_FILE,
                "windows": len(replay),
                "source": f"training windows, at most {REPLAY_MAX_PER_CLASS} per class",
            },
        },
        "quantization": {
            "method": "static QDQ (fleet_model.int8)",
            "recipe": RECIPE,
            "int8_layers": list(QUANT_LAYERS),
            "fp32_layers": [x for x in ADAPTABLE_LAYERS if x not in QUANT_LAYERS],
            "weights": "int8, symmetric, per output channel",
            "activations": "uint8, zero point 0, calibrated max rounded up to 5 bits",
            "calibration": {
                "file": CALIB_FILE,
                "windows": len(calib_x),
                "source": f"{CALIBRATION_PER_CLASS} training windows of each class, loudest"
                " to quietest",
            },
        },
        "opset": OPSET,
        "sha256": {name: file_sha256(out_dir / name) for name in CHECKED_FILES},
    }
    card_path = out_dir / CARD_FILE
    write_atomic(card_path, json.dumps(card, indent=1).encode(), 0o644)
    log.info(
        "pretrained base %s in %.1f s on %d windows: held-out accuracy fp32 %.3f int8 %.3f",
        sha_fp32[:12],
        time.monotonic() - t0,
        len(y_tr),
        acc_fp32,
        acc_int8,
    )
    return load_base_model(out_dir)


def load_base_model(base_dir: Path) -> BaseModel:
    """Open a base-model directory, checking every file against its card's sha256."""
    card_path = base_dir / CARD_FILE
    try:
        if card_path.stat().st_size > MAX_CARD_BYTES:
            raise TrainingError(f"{card_path} exceeds {MAX_CARD_BYTES} bytes")
        card = json.loads(card_path.read_bytes())
        hashes = {name: str(card["sha256"][name]) for name in CHECKED_FILES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(
            f"{base_dir} is not a base-model directory of this version ({exc}); run"
            " cloud-sidecar pretrain --dataset DIR --out it again"
        ) from exc
    if card.get("feature_version") != FEATURE_VERSION:
        raise TrainingError(
            f"{base_dir} was trained on {card.get('feature_version')!r} features, devices"
            f" upload {FEATURE_VERSION!r}; pretrain it again"
        )
    for name, expected in hashes.items():
        path = base_dir / name
        if not path.is_file() or file_sha256(path) != expected:
            raise TrainingError(f"{path} is missing or does not match its model card")
    return BaseModel(
        base_dir,
        base_dir / STATE_FILE,
        base_dir / FP32_FILE,
        base_dir / INT8_FILE,
        card_path,
        hashes[FP32_FILE],
        base_dir / CALIB_FILE,
        base_dir / GOLDEN_FILE,
        base_dir / REPLAY_FILE,
    )


def _load_npz(path: Path) -> tuple[F32, I64]:
    """A reference set's arrays, checked (the file's sha256 was checked on opening the base)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"{path} is not a reference set (x, y arrays): {exc}") from exc
    ok = (
        x.dtype == np.float32
        and y.dtype == np.int64
        and x.ndim == 3
        and x.shape[1:] == (N_BANDS, N_FRAMES)
        and y.shape == (len(x),)
        and 0 < len(x) <= MAX_REFERENCE_WINDOWS
        and int(y.min()) >= 0
        and int(y.max()) < len(CLASSES)
    )
    if not ok:
        raise TrainingError(f"{path}: arrays {x.dtype}{x.shape}, {y.dtype}{y.shape} are malformed")
    return x, y


def load_reference_sets(
    base: BaseModel, replay_per_class: int, golden_per_class: int
) -> tuple[tuple[F32, I64] | None, tuple[F32, I64]]:
    """(replay or None when ``replay_per_class`` is 0, golden) from the base-model directory.

    The first ``*_per_class`` windows of each class of ``replay.npz`` and ``golden.npz``
    (fewer where pretraining saved fewer): the base distribution a training run mixes in
    and is judged on, frozen at pretraining.
    """
    gx, gy = _load_npz(base.golden)
    g = _first_per_class(gy, golden_per_class)
    golden = (gx[g], gy[g])
    if replay_per_class <= 0:
        return None, golden
    rx, ry = _load_npz(base.replay)
    r = _first_per_class(ry, replay_per_class)
    return (rx[r], ry[r]), golden
