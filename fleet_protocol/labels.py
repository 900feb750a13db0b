"""The sound-event label set, and the label channel's messages.

``CLASSES`` is shared by the model, the events topic and every label. Labels come from
outside the device, as they do in a city: a downstream system (incident management, a
human reviewer, another sensor) sends ``LabelBatch`` messages naming a device and a
time range or an event id; the sidecar joins them to stored samples by device and
capture time and answers with a ``LabelResult``.

Invariants: the order of ``CLASSES`` is the model's output order; changing it changes
``LABELS_VERSION`` and requires a new base model. A ``LabelRecord`` names exactly one
span (a range of at most ``MAX_LABEL_SPAN_MS``, or one event's window); the source of a
batch is never read from its payload (the channel authenticates it).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, ConfigDict, Field, WithJsonSchema, model_validator

from fleet_protocol.topics import DeviceId
from fleet_protocol.wire import WireModel

LABELS_VERSION = "city-events-v1"
CLASSES: tuple[str, ...] = (
    "silence",
    "traffic",
    "engine",
    "siren",
    "horn",
    "glass_break",
    "construction",
    "rain",
    "wind",
    "dog_bark",
)
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
N_CLASSES = len(CLASSES)


def _known_class(name: str) -> str:
    if name not in CLASS_INDEX:
        raise ValueError(f"unknown class {name[:40]!r}; known: {', '.join(CLASSES)}")
    return name


ClassName = Annotated[
    str, AfterValidator(_known_class), WithJsonSchema({"type": "string", "enum": list(CLASSES)})
]


# -- the label channel: what downstream systems send (docs/labels.md) --------------------

WINDOW_MS = 1000  # a device window, and the span an event id names
MAX_LABEL_SPAN_MS = 7 * 24 * 3600 * 1000  # one record covers at most a week
MAX_LABELS_PER_BATCH = 10_000
EVENT_ID_RE = r"^[a-z0-9][a-z0-9-]{0,62}@[0-9]{1,16}$"


def event_id(device: str, time_ms: int) -> str:
    """The id of the event a device published for the window starting at ``time_ms``."""
    return f"{device}@{time_ms}"


class LabelRecord(WireModel):
    """One label: what was heard on ``device`` between ``start_ms`` and ``end_ms`` (Unix ms,
    end exclusive), or during the window of the event ``event_id`` names."""

    ABSTRACT: ClassVar[bool] = True  # part of LabelBatch, never sent alone

    device: DeviceId
    label: ClassName
    start_ms: int | None = Field(None, ge=0, le=2**53)
    end_ms: int | None = Field(None, ge=0, le=2**53)
    event_id: str | None = Field(None, pattern=EVENT_ID_RE)

    @model_validator(mode="after")
    def _one_span(self) -> Self:
        if self.event_id is not None:
            if self.start_ms is not None or self.end_ms is not None:
                raise ValueError("give either event_id or start_ms/end_ms, not both")
            if self.event_id.rsplit("@", 1)[0] != self.device:
                raise ValueError(f"event {self.event_id} is not one of {self.device}'s")
            return self
        if self.start_ms is None or self.end_ms is None:
            raise ValueError("give start_ms and end_ms, or event_id")
        if not 0 < self.end_ms - self.start_ms <= MAX_LABEL_SPAN_MS:
            raise ValueError(f"end_ms must be after start_ms, by at most {MAX_LABEL_SPAN_MS} ms")
        return self

    def span(self) -> tuple[int, int]:
        """``(start_ms, end_ms)``, resolving an event id to its window."""
        if self.event_id is not None:
            start = int(self.event_id.rsplit("@", 1)[1])
            return start, start + WINDOW_MS
        assert self.start_ms is not None and self.end_ms is not None
        return self.start_ms, self.end_ms


class LabelBatch(WireModel):
    """A downstream system → sidecar, on ``fleet/v1/labels/<source>`` (the source is the
    sender's certificate identity, taken from the topic) or as a CSV import."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "v": 1,
                    "batch_id": "incidents-20261202-0001",
                    "labels": [
                        {
                            "device": "pi-07",
                            "label": "siren",
                            "start_ms": 1764662400000,
                            "end_ms": 1764662412000,
                            "event_id": None,
                        },
                        {
                            "device": "pi-07",
                            "label": "horn",
                            "start_ms": None,
                            "end_ms": None,
                            "event_id": "pi-07@1764662430000",
                        },
                    ],
                }
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = 2 * 1024 * 1024

    v: Literal[1] = 1
    batch_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the sender's id")
    labels: tuple[LabelRecord, ...] = Field(min_length=1, max_length=MAX_LABELS_PER_BATCH)


class LabelError(WireModel):
    ABSTRACT: ClassVar[bool] = True  # part of LabelResult

    index: int = Field(ge=-1, le=MAX_LABELS_PER_BATCH, description="record index; -1: the batch")
    reason: str = Field(max_length=64)
    message: str = Field(max_length=500)


class LabelResult(WireModel):
    """Sidecar → the source, on ``fleet/v1/labels/<source>/result``: all or nothing."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "batch_id": "incidents-20261202-0001",
                    "status": "accepted",
                    "accepted": 2,
                    "errors": [],
                },
                {
                    "batch_id": "incidents-20261202-0002",
                    "status": "rejected",
                    "accepted": 0,
                    "errors": [
                        {
                            "index": 1,
                            "reason": "unknown_device",
                            "message": "no device 'pi-99' is registered",
                        }
                    ],
                },
            ]
        }
    )

    batch_id: str = Field(max_length=64)
    status: Literal["accepted", "rejected"]
    accepted: int = Field(ge=0, le=MAX_LABELS_PER_BATCH)
    errors: tuple[LabelError, ...] = Field(max_length=100)
