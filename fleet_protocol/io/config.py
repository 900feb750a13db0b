"""Reading a service's JSON configuration file into its pydantic model.

Owns the one way both services read config: at most ``MAX_CONFIG_BYTES``, JSON, then
validation; every failure is one exception of the caller's own error class whose
message names the file and, for validation errors, every bad field (one per line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

MAX_CONFIG_BYTES = 1024 * 1024
M = TypeVar("M", bound=BaseModel)


def load_json_model(path: Path, model: type[M], error: type[Exception]) -> M:
    """``model`` validated from the JSON file at ``path``; ``error`` for any failure."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read config {path}: {e.strerror}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise error(f"config {path} is larger than 1 MiB")
    try:
        return model.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not JSON: line {e.lineno} column {e.colno}: {e.msg}") from e
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise error(f"{path}: invalid configuration:\n  " + "\n  ".join(lines)) from e
    except (ValueError, RecursionError) as e:  # not UTF-8, a huge integer, nested too deeply
        raise error(f"{path}: not JSON: {str(e)[:120]}") from e
