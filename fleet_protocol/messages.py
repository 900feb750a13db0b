"""Small JSON control messages: acks, device status, OTA status, events.

Each has ``to_bytes`` and a capped, checked ``from_bytes`` that raises only
``ProtocolError`` subclasses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

from fleet_protocol.errors import MalformedError, TooLargeError

MAX_CONTROL_BYTES = 16 * 1024


def _load(data: bytes, cls: type[Any]) -> dict[str, Any]:
    if len(data) > MAX_CONTROL_BYTES:
        raise TooLargeError(f"{cls.__name__} of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..."
        raise MalformedError(f"{cls.__name__} is not JSON: {e}") from e
    names = {f.name for f in fields(cls)}
    if not isinstance(obj, dict) or set(obj) != names:
        raise MalformedError(f"{cls.__name__} must have exactly the fields {sorted(names)}")
    return obj


class _Json:
    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()  # type: ignore[call-overload]


@dataclass(frozen=True)
class Ack(_Json):
    """Cloud → device: the batch was stored (``stored``) or will never be (``rejected``)."""

    batch_id: str
    seq: int
    status: str  # stored | rejected
    reason: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        o = _load(data, cls)
        if o["status"] not in ("stored", "rejected") or not isinstance(o["batch_id"], str):
            raise MalformedError("ack has a bad status or batch id")
        if not isinstance(o["seq"], int) or not isinstance(o["reason"], str):
            raise MalformedError("ack has a bad seq or reason")
        return cls(**o)


@dataclass(frozen=True)
class OtaStatus(_Json):
    """Device → cloud: the outcome of an update attempt."""

    device: str
    metadata_version: int
    adapter_version: int
    state: str  # applied | rejected | failed
    reason: str
    model_sha256: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        o = _load(data, cls)
        if o["state"] not in ("applied", "rejected", "failed"):
            raise MalformedError("ota status has an unknown state")
        return cls(**o)


@dataclass(frozen=True)
class Event(_Json):
    """Device → city: one classification above its threshold."""

    device: str
    time_ms: int
    label: str
    score: float
    model_sha256: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return cls(**_load(data, cls))
