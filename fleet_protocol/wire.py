"""The base of every JSON wire message: a frozen, strict pydantic model with a byte cap.

Every message in ``fleet_protocol`` derives from ``WireModel``. Invariants:

- unknown fields are refused (``extra="forbid"``), types are strict (no "1" for 1,
  no 1 for True, no NaN or infinity), instances are frozen; integer fields carry
  bounds, so a huge number is refused by its field;
- ``from_bytes`` refuses more than the class's ``MAX_BYTES`` before parsing, and raises
  only ``ProtocolError`` subclasses (``TooLargeError``, ``MalformedError``) for any
  input: invalid UTF-8, lone surrogates, deep nesting, huge numbers, wrong types;
- ``to_bytes`` is canonical: sorted keys, no whitespace, UTF-8;
- ``json_schema()`` is what ``docs/schemas/`` holds for each message.
"""

from __future__ import annotations

import json
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from fleet_protocol.errors import MalformedError, TooLargeError

DEFAULT_MAX_BYTES = 16 * 1024


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if len(data) > cls.MAX_BYTES:
            raise TooLargeError(f"{cls.__name__} of {len(data)} bytes exceeds {cls.MAX_BYTES}")
        try:  # pydantic's own JSON parser: bounded nesting, strict UTF-8, no lone surrogates
            return cls.model_validate_json(data)
        except (ValidationError, ValueError, RecursionError) as e:
            raise MalformedError(f"{cls.__name__} is invalid: {_first_error(e)}") from e

    def to_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        return f"{loc}: {err['msg']}"[:300]
    return str(e)[:300]
