"""docs/schemas/ is generated from the wire models, up to date, and says what they accept.

``python -m fleet_protocol.schemas`` regenerates it; a stale, missing or hand-written
schema file fails here. jsonschema is not a dependency: the schemas use a small subset
of JSON Schema 2020-12, checked here by ``violations``, which refuses any keyword it does
not know (so a pass is never a keyword silently skipped) and is shown to reject bad
documents.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet_protocol import schemas
from fleet_protocol.enroll import CertResponse, EnrollRequest, RenewRequest
from fleet_protocol.labels import CLASSES
from fleet_protocol.messages import Ack, Event, OtaStatus
from fleet_protocol.telemetry import Reading, Telemetry
from fleet_protocol.topics import DEVICE_ID_RE
from fleet_protocol.wire import DeviceMessage, WireModel, canonical_json

DOCS = Path(__file__).parents[2] / "docs" / "schemas"
KNOWN = {Ack, CertResponse, EnrollRequest, Event, OtaStatus, RenewRequest, Telemetry}
MESSAGES = schemas.discover()
TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "null": type(None),
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment"}
CHECKED = {"type", "properties", "required", "additionalProperties", "items", "minItems"}
CHECKED |= {"maxItems", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum"}
CHECKED |= {"$ref", "$defs", "anyOf", "prefixItems", "const"}


def _schema(cls: type[WireModel]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCS / f"{cls.schema_name()}.schema.json").read_text())
    return data


def violations(obj: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> list[str]:
    """What in ``obj`` breaks ``schema`` (the subset this repository's schemas use)."""
    root = schema if root is None else root
    unknown = set(schema) - ANNOTATIONS - CHECKED
    assert not unknown, f"the checker does not know {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return violations(obj, root["$defs"][name], root)
    if "anyOf" in schema:  # optional fields: T or null
        branches = [violations(obj, s, root) for s in schema["anyOf"]]
        return [] if any(not b for b in branches) else [f"{obj!r} matches no anyOf branch"]
    want = TYPES[schema["type"]]
    if not isinstance(obj, want) or isinstance(obj, bool):
        return [f"{obj!r} is not {schema['type']}"]
    out: list[str] = []
    if schema["type"] == "object":
        out += [f"missing {k}" for k in schema.get("required", []) if k not in obj]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            out += [f"unexpected {k}" for k in obj if k not in props]
        for k, v in obj.items():
            if k in props:
                out += [f"{k}: {e}" for e in violations(v, props[k], root)]
    if schema["type"] == "array":
        if len(obj) < schema.get("minItems", 0) or len(obj) > schema.get("maxItems", len(obj)):
            out.append(f"{len(obj)} items")
        prefix = schema.get("prefixItems", [])
        out += [e for s, item in zip(prefix, obj, strict=False) for e in violations(item, s, root)]
        if "items" in schema:
            out += [
                e for item in obj[len(prefix) :] for e in violations(item, schema["items"], root)
            ]
    if "const" in schema and obj != schema["const"]:
        out.append(f"{obj!r} is not {schema['const']!r}")
    if "enum" in schema and obj not in schema["enum"]:
        out.append(f"{obj!r} not in enum")
    if "pattern" in schema and not re.search(schema["pattern"], obj):
        out.append(f"{obj!r} does not match {schema['pattern']}")
    if isinstance(obj, str) and not schema.get("minLength", 0) <= len(obj):
        out.append(f"{obj!r} too short")
    if isinstance(obj, str) and len(obj) > schema.get("maxLength", len(obj)):
        out.append(f"{obj!r} too long")
    if "minimum" in schema and obj < schema["minimum"]:
        out.append(f"{obj!r} < {schema['minimum']}")
    if "maximum" in schema and obj > schema["maximum"]:
        out.append(f"{obj!r} > {schema['maximum']}")
    return out


def test_docs_schemas_are_exactly_what_the_models_generate(tmp_path: Path) -> None:
    written = schemas.write(tmp_path)
    assert schemas.differences(DOCS) == [], (
        "run: python -m fleet_protocol.schemas --out docs/schemas"
    )
    assert sorted(p.name for p in DOCS.glob("*.schema.json")) == sorted(p.name for p in written)
    for path in written:
        assert (DOCS / path.name).read_bytes() == path.read_bytes()


def test_a_stale_or_extra_schema_file_is_reported_and_rewritten(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    (tmp_path / "event.schema.json").write_text("{}\n")
    (tmp_path / "gone.schema.json").write_text("{}\n")
    assert schemas.differences(tmp_path) == [
        "not generated by any message: gone.schema.json",
        "stale event.schema.json",
    ]
    assert schemas.main(["--out", str(tmp_path), "--check"]) == 1
    schemas.write(tmp_path)
    assert schemas.differences(tmp_path) == []
    assert schemas.main(["--out", str(tmp_path), "--check"]) == 0


def test_discovery_finds_every_message_and_no_base_or_part() -> None:
    assert set(MESSAGES) >= KNOWN
    assert not {WireModel, DeviceMessage, Reading} & set(MESSAGES)
    assert all(cls.is_message() for cls in MESSAGES)


PROBE = """
from fleet_protocol import schemas
from fleet_protocol.messages import Event
from fleet_protocol.wire import WireModel

class ProbeBase(WireModel):  # a base another module adds later, with a message under it
    ABSTRACT = True

class ProbeNotice(ProbeBase):
    note: str = ""

class LaterNotice(ProbeNotice):
    pass

found = schemas.discover()
assert ProbeNotice in found and LaterNotice in found and ProbeBase not in found, found
assert Event in found
print(sorted(schemas.expected()))
"""


def test_a_message_defined_anywhere_is_discovered() -> None:
    """In a child process, so the probe classes never join this process's subclasses."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "probe_notice.schema.json" in out.stdout and "later_notice.schema.json" in out.stdout


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_every_schema_is_closed_and_requires_every_field(cls: type[WireModel]) -> None:
    schema = _schema(cls)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == set(cls.model_fields)
    assert schema["examples"], f"{cls.__name__} needs model_config json_schema_extra examples"


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_schema_examples_validate_and_round_trip_through_the_model(cls: type[WireModel]) -> None:
    schema = _schema(cls)
    for example in schema["examples"]:
        assert violations(example, schema) == []
        data = canonical_json(example)
        assert cls.from_bytes(data).to_bytes() == data
        assert len(data) <= cls.MAX_BYTES


def test_event_label_enum_and_device_pattern_match_the_protocol() -> None:
    schema = _schema(Event)
    assert tuple(schema["properties"]["label"]["enum"]) == CLASSES
    assert schema["properties"]["device"]["pattern"] == DEVICE_ID_RE.pattern


@pytest.mark.parametrize("label", CLASSES)
def test_every_label_is_a_valid_event_and_validates_against_the_schema(label: str) -> None:
    example = _schema(Event)["examples"][0]
    event = Event.model_validate({**example, "label": label})
    assert violations(json.loads(event.to_bytes()), _schema(Event)) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"score": 1.5},
        {"score": "0.9"},
        {"time_ms": 1.5},
        {"time_ms": -1},
        {"label": "speech"},
        {"device": "Edge 01"},
        {"model_sha256": "xyz"},
    ],
)
def test_schema_and_model_both_reject_events_outside_the_contract(bad: dict[str, Any]) -> None:
    obj = {**_schema(Event)["examples"][0], **bad}
    assert violations(obj, _schema(Event))
    with pytest.raises(ValueError):
        Event.model_validate(obj)


def test_schema_rejects_missing_and_extra_fields_and_bad_nested_readings() -> None:
    obj = _schema(Event)["examples"][0]
    assert violations({k: v for k, v in obj.items() if k != "label"}, _schema(Event)) == [
        "missing label"
    ]
    assert violations({**obj, "audio": "..."}, _schema(Event)) == ["unexpected audio"]
    t = _schema(Telemetry)["examples"][0]
    assert violations({**t, "readings": []}, _schema(Telemetry)) == ["readings: 0 items"]
    bad_reading = {**t["readings"][0], "unit": "dB A"}
    assert violations({**t, "readings": [bad_reading]}, _schema(Telemetry))
