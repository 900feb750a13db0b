"""The base of every JSON wire message: a frozen, strict pydantic model with a byte cap.

Every JSON message in ``fleet_protocol`` derives from ``WireModel``. Invariants:

- unknown fields are refused (``extra="forbid"``), types are strict (no "1" for 1,
  no 1 for True, no NaN or infinity), instances are frozen; integer fields carry
  bounds (``UInt63``), strings a maximum length and a pattern, so a huge number or an
  odd string is refused by its field;
- ``from_bytes`` refuses more than the class's ``MAX_BYTES`` before parsing, and raises
  only ``ProtocolError`` subclasses (``TooLargeError``, ``MalformedError``) for any
  input: invalid UTF-8, lone surrogates, deep nesting, huge numbers, wrong types; the
  ``reason`` is the class's ``FIELD_REASONS`` entry for the first invalid field, else
  ``malformed``;
- ``to_bytes`` is canonical (``canonical_json``: sorted keys, no whitespace, UTF-8) and
  raises only ``MalformedError``, whatever the instance holds;
- a message a device sends on its own topic derives from ``DeviceMessage``; the cloud
  parses it with ``parse_device_message``, which refuses a payload naming another device
  than the (broker-authenticated) topic with reason ``device_mismatch``;
- ``json_schema()`` is what ``docs/schemas/`` holds for each message
  (``python -m fleet_protocol.schemas``); classes with ``ABSTRACT = True`` in their own
  body (bases, nested parts) get no schema file of their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, TooLargeError

DEFAULT_MAX_BYTES = 16 * 1024
MAX_UINT63 = 2**63 - 1
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

UInt63 = Annotated[int, Field(ge=0, le=MAX_UINT63)]
DeviceId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=topics.DEVICE_ID_RE.pattern,
        description="device id: the CN of the device's certificate (fleet_protocol.topics)",
    ),
]
Sha256Hex = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
ReasonCode = Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_]*$")]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; ``MalformedError`` for what JSON cannot hold.

    A lone surrogate (``"\\ud800"``) cannot be UTF-8: it is refused here rather than
    escaping as ``UnicodeEncodeError`` from whoever canonicalises a document.
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise MalformedError(f"not encodable as canonical JSON: {str(e)[:120]}") from e


class WireModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        regex_engine="rust-regex",  # linear time; "$" is the end of the string, never "\n"
        json_schema_serialization_defaults_required=True,
    )

    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {}
    ABSTRACT: ClassVar[bool] = True  # subclasses that are messages leave it out

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if not isinstance(data, bytes | bytearray):
            raise MalformedError(f"{cls.__name__} must be bytes")
        if len(data) > cls.MAX_BYTES:
            raise TooLargeError(f"{cls.__name__} of {len(data)} bytes exceeds {cls.MAX_BYTES}")
        try:  # pydantic's own JSON parser: bounded nesting, strict UTF-8, no lone surrogates
            return cls.model_validate_json(data)
        except (ValidationError, ValueError, RecursionError) as e:
            raise MalformedError(
                f"{cls.__name__} is invalid: {_first_error(e)}", cls._reason(e)
            ) from e

    @classmethod
    def _reason(cls, e: Exception) -> str | None:
        if isinstance(e, ValidationError) and e.error_count():
            loc = e.errors(include_url=False)[0]["loc"]
            if loc:
                return cls.FIELD_REASONS.get(str(loc[0]))
        return None

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def is_message(cls) -> bool:
        """True for a message (it has a schema file), False for a base or a nested part."""
        return not cls.__dict__.get("ABSTRACT", False)

    @classmethod
    def schema_name(cls) -> str:
        """``OtaStatus`` -> ``ota_status`` (its file: ``docs/schemas/ota_status.schema.json``)."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema (2020-12) of exactly what ``to_bytes`` writes and ``from_bytes`` takes."""
        schema = cls.model_json_schema(mode="serialization")
        return {
            "$schema": SCHEMA_DIALECT,
            "$id": f"https://sovereign-edge.example/schemas/{cls.schema_name()}.schema.json",
            "$comment": f"{cls.__module__}.{cls.__qualname__}: canonical UTF-8 JSON (sorted"
            f" keys, no whitespace), at most {cls.MAX_BYTES} bytes. Generated by"
            " `python -m fleet_protocol.schemas`; do not edit.",
            **schema,
        }


class DeviceMessage(WireModel):
    """A message a device publishes on its own ``fleet/v1/<device>/<TOPIC_KIND>`` topic."""

    ABSTRACT: ClassVar[bool] = True
    TOPIC_KIND: ClassVar[str] = ""
    FIELD_REASONS: ClassVar[Mapping[str, str]] = {"device": "bad_device_id"}

    device: DeviceId


D = TypeVar("D", bound=DeviceMessage)


def parse_device_message(topic: str, payload: bytes, model: type[D]) -> D:
    """Parse ``payload`` from ``topic``; the device is the topic's, never the payload's.

    Raises ``MalformedError(bad_topic)`` when the topic is not ``model``'s kind,
    the model's own errors for the payload, and ``MalformedError(device_mismatch)``
    when the payload names another device than the topic.
    """
    device = topics.device_of(topic, model.TOPIC_KIND)
    msg = model.from_bytes(payload)
    if msg.device != device:
        raise MalformedError(
            f"{model.__name__} names {msg.device!r} on the topic of {device!r}",
            reason="device_mismatch",
        )
    return msg


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        return f"{loc}: {err['msg']}"[:300]
    return str(e)[:300]


__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_UINT63",
    "DeviceId",
    "DeviceMessage",
    "ReasonCode",
    "Sha256Hex",
    "UInt63",
    "WireModel",
    "canonical_json",
    "parse_device_message",
]
