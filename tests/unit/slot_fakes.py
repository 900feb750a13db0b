"""File-backed stand-ins for model building and loading in the slot tests (no ONNX needed).

``build`` writes ``model.int8`` = ``b"model:" + adapter bytes`` (fsync'd); ``load``
refuses a file that does not have that shape, so a half-written model cannot pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet_protocol.io.files import write_atomic


def build(adapter: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = adapter.read_bytes()
    if data.startswith(b"broken"):
        raise ValueError("adapter does not merge")
    write_atomic(out_dir / "model.int8", b"model:" + data, 0o644)
    dfd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return out_dir / "model.int8"


def load(path: Path | None) -> str:
    if path is None:
        return "base"
    data = path.read_bytes()
    if not data.startswith(b"model:"):
        raise ValueError(f"{path} is not a model")
    return data.decode("latin-1")


def shadow_check(model: str, golden: object = None) -> str:
    return "golden_mismatch" if "bad-golden" in model else ""
