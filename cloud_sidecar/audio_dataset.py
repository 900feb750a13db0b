"""Labeled audio on disk → upload-feature windows for pretraining: the reader of ``pretrain --dataset``.

Owns the dataset layouts (``docs/datasets.md``), the typed caps on everything read, the
train/held-out split and the dataset manifest. Layouts, all under one directory ``DIR``:

- ``folders``: ``DIR/<label>/*.wav|*.flac`` (one level; hidden entries ignored);
- ``esc50``: ``DIR/meta/esc50.csv`` (``filename,fold,target,category,...``), audio in
  ``DIR/audio/<filename>``;
- ``urbansound8k``: ``DIR/metadata/UrbanSound8K.csv`` (``slice_file_name,...,fold,
  classID,class``), audio in ``DIR/audio/fold<fold>/<slice_file_name>``;
- ``csv``: ``DIR/manifest.csv`` with a header naming ``path,label`` and optionally
  ``fold``; ``path`` is relative to ``DIR``, with ``/``.

Invariants:

- every untrusted read is capped by ``DatasetConfig`` (file count, CSV bytes, audio file
  bytes, seconds per file, windows in all); a path that leaves ``DIR`` (absolute, ``..``,
  or a symlink resolving outside) is always refused, whatever the bad-file policy;
- labels become model classes only through ``cloud_sidecar.class_maps``; a label no map
  knows is skipped and counted, or refused when ``strict``;
- the split is per file, so a file's windows never straddle train and held-out: by
  fold where the CSV has folds (held out: ``held_out_folds``, default the highest fold),
  otherwise ``sha256(path) < held_out_fraction``, stable as files are added; a class with
  two or more files gets at least one file on each side;
- a bad file (missing, over the cap, unreadable) is one ``DatasetError`` naming it, or,
  with ``bad_files="skip"``, skipped and counted, up to ``max_bad_fraction`` of the files;
- the manifest (``path,sha256,class,label,fold,split,windows``: one row per file that
  gave windows, sorted by path) hashes the audio bytes and labels actually used; its
  sha256 identifies the dataset in the model card.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from cloud_sidecar.audio_windows import BadAudioError, WindowRule, file_windows
from cloud_sidecar.class_maps import ClassResolver, load_class_map
from cloud_sidecar.errors import DatasetError
from fleet_protocol.features import N_BANDS, N_FRAMES, SAMPLE_RATE, WINDOW_SAMPLES, features_batch
from fleet_protocol.labels import CLASS_INDEX

log = logging.getLogger(__name__)

Layout = Literal["auto", "folders", "esc50", "urbansound8k", "csv"]
LAYOUTS: tuple[str, ...] = ("folders", "esc50", "urbansound8k", "csv")
CSV_FILES = {
    "esc50": PurePosixPath("meta/esc50.csv"),
    "urbansound8k": PurePosixPath("metadata/UrbanSound8K.csv"),
    "csv": PurePosixPath("manifest.csv"),
}
CSV_COLUMNS = {  # (path column, label column, fold column or "")
    "esc50": ("filename", "category", "fold"),
    "urbansound8k": ("slice_file_name", "class", "fold"),
    "csv": ("path", "label", ""),
}
AUDIO_SUFFIXES = (".wav", ".flac")
MAX_PATH_CHARS = 1024
MAX_FOLD = 1000
MAX_EXAMPLES = 10  # bad files named in the summary
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class DatasetConfig(BaseModel):
    """Caps and policies of the reader; every field has a safe default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_files: int = Field(100_000, ge=1, description="audio files (CSV rows) at most")
    max_file_bytes: int = Field(64 << 20, ge=1024, description="bytes per audio file")
    max_csv_bytes: int = Field(16 << 20, ge=1024, description="bytes of the CSV manifest")
    max_class_map_bytes: int = Field(1 << 20, ge=2, description="bytes of --class-map")
    max_seconds_per_file: float = Field(600.0, gt=0, description="decoded seconds per file")
    max_windows: int = Field(200_000, ge=1, description="1-s windows in all (memory bound)")
    min_tail_s: float = Field(0.5, gt=0, le=1, description="shortest tail kept as a window")
    min_window_dbfs: float = Field(-60.0, description="quieter non-silence windows dropped")
    max_below_loudest_db: float = Field(
        40.0, gt=0, description="non-silence windows this far under the file's loudest dropped"
    )
    held_out_fraction: float = Field(0.15, gt=0, lt=1, description="without folds: by hash")
    held_out_folds: tuple[int, ...] | None = Field(
        None, description="folds held out where the CSV has folds; None: the highest"
    )
    strict: bool = Field(False, description="refuse a label no class map knows")
    bad_files: Literal["fail", "skip"] = Field("fail", description="a bad file stops or is skipped")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="skip: more bad files fail")
    feature_chunk: int = Field(128, ge=1, le=4096, description="windows featurised at a time")

    def window_rule(self) -> WindowRule:
        return WindowRule(self.min_tail_s, self.min_window_dbfs, self.max_below_loudest_db)


@dataclass(frozen=True)
class AudioItem:
    path: str  # relative to the dataset directory, with "/"
    label: str  # the dataset's own label
    cls: str  # the model class it maps to
    fold: int | None


@dataclass(frozen=True)
class DatasetIndex:
    root: Path
    layout: str
    items: tuple[AudioItem, ...]  # sorted by path
    unmapped: dict[str, int]  # label -> files: no map knows the label
    excluded: dict[str, int]  # label -> files: a map says null
    ignored: int  # non-audio or hidden entries of a folder layout
    class_map_sha256: str | None  # of the operator's --class-map file, if one was given


@dataclass(frozen=True)
class LoadedDataset:
    x: F32  # (N, N_BANDS, N_FRAMES)
    y: I64  # (N,) indices into CLASSES
    held_out: npt.NDArray[np.bool_]  # (N,)
    manifest: bytes  # the manifest CSV
    manifest_sha256: str
    summary: dict[str, Any]  # what the model card records


@dataclass
class _Tally:
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    quiet_windows: int = 0
    no_windows: int = 0


def detect_layout(root: Path) -> str:
    """The layout of ``root``: a known CSV manifest if present, otherwise folders."""
    for layout, rel in CSV_FILES.items():
        if (root / rel).is_file():
            return layout
    return "folders"


def _inside(root: Path, rel: str, where: str) -> Path:
    """``root/rel`` if it stays inside ``root`` (symlinks resolved); else ``DatasetError``."""
    p = PurePosixPath(rel)
    if (
        not rel
        or len(rel) > MAX_PATH_CHARS
        or "\\" in rel
        or "\x00" in rel
        or p.is_absolute()
        or ".." in p.parts
    ):
        raise DatasetError(
            f"{where}: path {rel[:100]!r} points outside the dataset directory; paths must be"
            " relative to it, with '/', and without '..'",
            where,
        )
    full = (root / p).resolve()
    if not full.is_relative_to(root):
        raise DatasetError(
            f"{where}: {rel!r} resolves to {full}, outside the dataset directory {root}"
            " (a symlink?); copy the file into the dataset",
            where,
        )
    return full


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    with path.open("rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise BadAudioError(f"{what} is over the {cap}-byte cap")
    return data


def _resolver(
    layout: str, class_map: Path | Mapping[str, str | None] | None, cfg: DatasetConfig
) -> tuple[ClassResolver, str | None]:
    if isinstance(class_map, Path):
        entries, sha = load_class_map(class_map, cfg.max_class_map_bytes)
        return ClassResolver(layout, entries), sha
    return ClassResolver(layout, class_map), None


def _folder_rows(root: Path, cfg: DatasetConfig) -> Iterator[tuple[str, str, int | None]]:
    """(relative path, label, None) of every audio file one level under a class folder."""
    n = 0
    for class_dir in sorted(root.iterdir()):
        if class_dir.name.startswith(".") or not class_dir.is_dir():
            continue
        for entry in sorted(class_dir.iterdir()):
            n += 1
            if n > cfg.max_files:
                raise DatasetError(
                    f"{root} holds more than {cfg.max_files} entries in its class folders;"
                    " raise max_files or split the dataset",
                    str(root),
                )
            rel = f"{class_dir.name}/{entry.name}"
            _inside(root, rel, str(entry))
            yield rel, class_dir.name, None


def _csv_rows(root: Path, layout: str, cfg: DatasetConfig) -> Iterator[tuple[str, str, int | None]]:
    """(relative audio path, label, fold) of every row of the layout's CSV manifest."""
    csv_path = root / CSV_FILES[layout]
    where = str(csv_path)
    try:
        if csv_path.stat().st_size > cfg.max_csv_bytes:
            raise DatasetError(
                f"{csv_path} is over the {cfg.max_csv_bytes}-byte cap; is it the right"
                " file? (raise max_csv_bytes for a larger set)",
                where,
            )
        text = _read_capped(csv_path, cfg.max_csv_bytes, "the CSV").decode("utf-8-sig")
    except (OSError, BadAudioError) as exc:
        raise DatasetError(f"cannot read {csv_path}: {exc}", where) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path} is not UTF-8 text: {exc}", where) from exc
    path_col, label_col, fold_col = CSV_COLUMNS[layout]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    has_fold = bool(fold_col) or "fold" in header
    fold_col = fold_col or "fold"
    missing = [
        c for c in (path_col, label_col, *([fold_col] if has_fold else [])) if c not in header
    ]
    if missing:
        raise DatasetError(
            f"{csv_path}: the header {header} lacks {missing}; see docs/datasets.md for the"
            f" {layout} layout",
            where,
        )
    try:
        for i, row in enumerate(reader, start=2):
            if i - 1 > cfg.max_files:
                raise DatasetError(f"{csv_path} has more than {cfg.max_files} rows", where)
            name, label = row.get(path_col) or "", (row.get(label_col) or "").strip()
            if not label:
                raise DatasetError(f"{csv_path}:{i}: empty {label_col!r}", where)
            fold = None
            if has_fold:
                try:
                    fold = int(row.get(fold_col) or "")
                except ValueError:
                    fold = -1
                if not 0 <= fold <= MAX_FOLD:
                    raise DatasetError(
                        f"{csv_path}:{i}: fold {row.get(fold_col)!r} is not a number in 0..{MAX_FOLD}",
                        where,
                    )
            if layout == "esc50":
                rel = f"audio/{name}"
            elif layout == "urbansound8k":
                rel = f"audio/fold{fold}/{name}"
            else:
                rel = name
            _inside(root, rel, f"{csv_path}:{i}")
            if "/" in name and layout != "csv":
                raise DatasetError(f"{csv_path}:{i}: {name!r} must be a bare file name", where)
            yield rel, label, fold
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}: malformed CSV: {exc}", where) from exc


def scan_dataset(
    root: Path,
    layout: Layout = "auto",
    class_map: Path | Mapping[str, str | None] | None = None,
    cfg: DatasetConfig | None = None,
) -> DatasetIndex:
    """List the dataset's audio files with their model classes; reads no audio."""
    cfg = cfg or DatasetConfig()
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist", str(root))
    root = root.resolve()
    chosen = detect_layout(root) if layout == "auto" else layout
    if chosen not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; use one of {LAYOUTS}", str(root))
    resolver, map_sha = _resolver(chosen, class_map, cfg)
    rows = _folder_rows(root, cfg) if chosen == "folders" else _csv_rows(root, chosen, cfg)
    items: dict[str, AudioItem] = {}
    unmapped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    ignored = 0
    for rel, label, fold in rows:
        if chosen == "folders" and (
            rel.rsplit("/", 1)[1].startswith(".") or not rel.lower().endswith(AUDIO_SUFFIXES)
        ):
            ignored += 1
            continue
        try:
            cls = resolver.resolve(label)
        except KeyError:
            if cfg.strict:
                raise DatasetError(
                    f"{root / rel}: label {label!r} is no model class and no class map names"
                    " it; add it to a --class-map JSON file (a class, or null to skip it)",
                    str(root / rel),
                ) from None
            unmapped[label] += 1
            continue
        if cls is None:
            excluded[label] += 1
            continue
        if rel in items:
            raise DatasetError(f"{root / rel} is listed twice; remove one row", str(root / rel))
        items[rel] = AudioItem(rel, label, cls, fold)
    index = DatasetIndex(
        root,
        chosen,
        tuple(items[k] for k in sorted(items)),
        dict(unmapped),
        dict(excluded),
        ignored,
        map_sha,
    )
    log.debug(
        "dataset %s (%s): %d files, %d unmapped, %d excluded",
        root,
        chosen,
        len(index.items),
        sum(unmapped.values()),
        sum(excluded.values()),
    )
    return index


def _bucket(path: str) -> float:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2.0**64


def split_held_out(items: tuple[AudioItem, ...], cfg: DatasetConfig) -> tuple[list[bool], str]:
    """Per file: held out? And the rule in words (for the model card)."""
    folds = {it.fold for it in items}
    if items and None not in folds:
        present = sorted(f for f in folds if f is not None)
        chosen = set(cfg.held_out_folds or (present[-1],))
        if not chosen <= set(present):
            raise DatasetError(
                f"held-out folds {sorted(chosen - set(present))} are not in the CSV (folds"
                f" {present})"
            )
        return [it.fold in chosen for it in items], f"folds {sorted(chosen)} held out"
    buckets = [_bucket(it.path) for it in items]
    held = [b < cfg.held_out_fraction for b in buckets]
    by_class: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.cls, []).append(i)
    for idx in by_class.values():  # two or more files: at least one on each side
        if len(idx) >= 2 and not any(held[i] for i in idx):
            held[min(idx, key=lambda i: buckets[i])] = True
        if len(idx) >= 2 and all(held[i] for i in idx):
            held[max(idx, key=lambda i: buckets[i])] = False
    return held, f"sha256(path) < {cfg.held_out_fraction} held out (per file)"


def _bad(tally: _Tally, cfg: DatasetConfig, root: Path, rel: str, reason: str) -> None:
    path = root / rel
    if cfg.bad_files == "fail":
        raise DatasetError(
            f"{path}: {reason}. Fix or remove the file, or pass --skip-bad-files to skip"
            " and count bad files",
            str(path),
        )
    log.warning("skipping %s: %s", path, reason)
    tally.bad.append((rel, reason))


def load_dataset(
    root: Path,
    layout: Layout = "auto",
    class_map: Path | Mapping[str, str | None] | None = None,
    cfg: DatasetConfig | None = None,
) -> LoadedDataset:
    """Scan, split, decode, window and featurise a dataset (see the module docstring)."""
    cfg = cfg or DatasetConfig()
    index = scan_dataset(root, layout, class_map, cfg)
    if not index.items:
        raise DatasetError(
            f"{root} holds no usable audio for the model's classes (layout {index.layout};"
            f" unmapped labels {index.unmapped or 'none'}); see docs/datasets.md",
            str(root),
        )
    held, split_rule = split_held_out(index.items, cfg)
    tally = _Tally()
    feats: list[F32] = []
    labels: list[int] = []
    held_flags: list[bool] = []
    pending: list[F32] = []
    n_pending = 0
    rows: list[list[str]] = []
    rule = cfg.window_rule()

    def flush(final: bool) -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        audio = np.concatenate(pending)
        cut = len(audio) if final else len(audio) - len(audio) % cfg.feature_chunk
        for i in range(0, cut, cfg.feature_chunk):
            feats.append(features_batch(audio[i : min(i + cfg.feature_chunk, cut)]))
        pending = [audio[cut:]] if cut < len(audio) else []
        n_pending = len(audio) - cut

    for item, is_held in zip(index.items, held, strict=True):
        path = index.root / item.path
        try:
            data = _read_capped(path, cfg.max_file_bytes, "the file")
            got = file_windows(
                data,
                silence=item.cls == "silence",
                max_seconds=cfg.max_seconds_per_file,
                rule=rule,
            )
        except FileNotFoundError:
            _bad(tally, cfg, index.root, item.path, "missing (named by the dataset's CSV)")
            continue
        except OSError as exc:
            _bad(tally, cfg, index.root, item.path, f"cannot be read ({exc.strerror or exc})")
            continue
        except BadAudioError as exc:
            _bad(tally, cfg, index.root, item.path, str(exc))
            continue
        tally.quiet_windows += got.quiet_dropped
        k = len(got.windows)
        if k == 0:
            tally.no_windows += 1
            continue
        if len(labels) + k > cfg.max_windows:
            raise DatasetError(
                f"{root} gives more than {cfg.max_windows} windows (at {path}); raise"
                " max_windows or use a subset",
                str(root),
            )
        pending.append(got.windows)
        n_pending += k
        labels += [CLASS_INDEX[item.cls]] * k
        held_flags += [is_held] * k
        fold = "" if item.fold is None else str(item.fold)
        split = "held_out" if is_held else "train"
        rows.append(
            [item.path, hashlib.sha256(data).hexdigest(), item.cls, item.label, fold, split, str(k)]
        )
        if n_pending >= cfg.feature_chunk:
            flush(final=False)
    flush(final=True)

    n_files = len(index.items)
    if tally.bad and len(tally.bad) > cfg.max_bad_fraction * n_files:
        raise DatasetError(
            f"{len(tally.bad)} of {n_files} files are bad (over max_bad_fraction"
            f" {cfg.max_bad_fraction}); first: {tally.bad[0][0]}: {tally.bad[0][1]}",
            str(root),
        )
    y = np.asarray(labels, dtype=np.int64)
    x = np.concatenate(feats) if feats else np.empty((0, N_BANDS, N_FRAMES), np.float32)
    held_out = np.asarray(held_flags, dtype=bool)
    _check_usable(root, y, held_out)
    manifest = _manifest_bytes(rows)
    sha = hashlib.sha256(manifest).hexdigest()
    summary = _summary(index, rows, y, held_out, tally, split_rule, sha, class_map)
    log.info(
        "dataset %s (%s): %d files, %d windows (%d held out), manifest %s",
        index.root,
        index.layout,
        len(rows),
        len(y),
        int(held_out.sum()),
        sha[:12],
    )
    return LoadedDataset(x, y, held_out, manifest, sha, summary)


def _check_usable(root: Path, y: I64, held_out: npt.NDArray[np.bool_]) -> None:
    if len(np.unique(y)) < 2:
        raise DatasetError(
            f"{root} gives windows of {len(np.unique(y))} class(es); a classifier needs at"
            " least two (check the class map and the skipped counts)",
            str(root),
        )
    if not held_out.any() or held_out.all():
        side = "held-out" if not held_out.any() else "training"
        raise DatasetError(
            f"{root}: the {side} split is empty; add files (or choose held_out_folds)",
            str(root),
        )


def _manifest_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["path", "sha256", "class", "label", "fold", "split", "windows"])
    w.writerows(rows)
    return out.getvalue().encode()


def _summary(
    index: DatasetIndex,
    rows: list[list[str]],
    y: I64,
    held_out: npt.NDArray[np.bool_],
    tally: _Tally,
    split_rule: str,
    sha: str,
    class_map: Path | Mapping[str, str | None] | None,
) -> dict[str, Any]:
    files = Counter(r[2] for r in rows)
    classes = {}
    for cls, n_files in sorted(files.items()):
        mask = y == CLASS_INDEX[cls]
        classes[cls] = {
            "files": n_files,
            "windows": int(mask.sum()),
            "held_out_windows": int((mask & held_out).sum()),
        }
    return {
        "layout": index.layout,
        "path": str(index.root),
        "manifest_sha256": sha,
        "class_map": str(class_map) if isinstance(class_map, Path) else None,
        "class_map_sha256": index.class_map_sha256,
        "files": len(rows),
        "windows": len(y),
        "held_out_windows": int(held_out.sum()),
        "window_seconds": WINDOW_SAMPLES / SAMPLE_RATE,
        "split": split_rule,
        "classes": classes,
        "skipped": {
            "unmapped_labels": dict(sorted(index.unmapped.items())),
            "excluded_labels": dict(sorted(index.excluded.items())),
            "bad_files": len(tally.bad),
            "bad_file_examples": [f"{rel}: {why}" for rel, why in tally.bad[:MAX_EXAMPLES]],
            "files_without_windows": tally.no_windows,
            "quiet_windows": tally.quiet_windows,
            "ignored_entries": index.ignored,
        },
    }
