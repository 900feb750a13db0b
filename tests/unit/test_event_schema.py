"""docs/schemas/event.schema.json documents exactly what ``Event.to_bytes()`` publishes.

jsonschema is not a dependency; the schema uses a small subset of JSON Schema (type,
required, additionalProperties, pattern, enum, minimum, maximum), checked here by hand.
The checker itself is shown to reject bad events, so a pass is not vacuous.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from fleet_protocol.labels import CLASSES
from fleet_protocol.messages import MAX_CONTROL_BYTES, Event
from fleet_protocol.topics import DEVICE_ID_RE

SCHEMA = json.loads(
    (Path(__file__).parents[2] / "docs" / "schemas" / "event.schema.json").read_text()
)
TYPES: dict[str, Any] = {"object": dict, "string": str, "integer": int, "number": (int, float)}


def violations(obj: Any, schema: dict[str, Any] = SCHEMA) -> list[str]:
    """What in ``obj`` breaks ``schema`` (the subset this repository's schemas use)."""
    out: list[str] = []
    want = TYPES[schema["type"]]
    if not isinstance(obj, want) or isinstance(obj, bool):
        return [f"{obj!r} is not {schema['type']}"]
    if schema["type"] == "object":
        out += [f"missing {k}" for k in schema.get("required", []) if k not in obj]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            out += [f"unexpected {k}" for k in obj if k not in props]
        for k, v in obj.items():
            if k in props:
                out += [f"{k}: {e}" for e in violations(v, props[k])]
    if "enum" in schema and obj not in schema["enum"]:
        out.append(f"{obj!r} not in enum")
    if "pattern" in schema and not re.search(schema["pattern"], obj):
        out.append(f"{obj!r} does not match {schema['pattern']}")
    if "minimum" in schema and obj < schema["minimum"]:
        out.append(f"{obj!r} < {schema['minimum']}")
    if "maximum" in schema and obj > schema["maximum"]:
        out.append(f"{obj!r} > {schema['maximum']}")
    return out


def _event(**kw: Any) -> Event:
    base: dict[str, Any] = {
        "device": "edge-01",
        "time_ms": 1_763_800_000_000,
        "label": "siren",
        "score": 0.9312,
        "model_sha256": "ab" * 32,
    }
    return Event(**(base | kw))


@pytest.mark.parametrize("label", CLASSES)
def test_event_to_bytes_validates_against_the_documented_schema(label: str) -> None:
    data = _event(label=label).to_bytes()
    assert len(data) <= MAX_CONTROL_BYTES
    assert violations(json.loads(data)) == []


def test_schema_fields_are_exactly_the_event_dataclass_fields() -> None:
    names = {f.name for f in fields(Event)}
    assert set(SCHEMA["required"]) == names == set(SCHEMA["properties"])
    assert SCHEMA["additionalProperties"] is False


def test_schema_label_enum_and_device_pattern_match_the_protocol() -> None:
    assert tuple(SCHEMA["properties"]["label"]["enum"]) == CLASSES
    assert SCHEMA["properties"]["device"]["pattern"] == DEVICE_ID_RE.pattern


def test_schema_examples_validate_and_round_trip_through_event() -> None:
    for example in SCHEMA["examples"]:
        assert violations(example) == []
        assert json.loads(Event.from_bytes(json.dumps(example).encode()).to_bytes()) == example


@pytest.mark.parametrize(
    "bad",
    [
        {"score": 1.5},
        {"score": "0.9"},
        {"time_ms": 1.5},
        {"label": "speech"},
        {"device": "Edge 01"},
        {"model_sha256": "xyz"},
    ],
)
def test_schema_rejects_events_outside_the_contract(bad: dict[str, Any]) -> None:
    obj = json.loads(_event().to_bytes()) | bad
    assert violations(obj)


def test_schema_rejects_missing_and_extra_fields() -> None:
    obj = json.loads(_event().to_bytes())
    assert violations({k: v for k, v in obj.items() if k != "label"}) == ["missing label"]
    assert violations(obj | {"audio": "..."}) == ["unexpected audio"]
