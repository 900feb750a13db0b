"""MQTT topic names of protocol v1, and their parsing.

Invariants: a device id is ``^[a-z0-9][a-z0-9-]{0,62}$`` and equals the CN of the
device's certificate; the broker's ACL lets a device write only under
``fleet/v1/<its id>/`` and read only its own ack and the OTA tree, so the device id
taken from an upload topic is authenticated by the broker.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

from fleet_protocol.errors import MalformedError

PREFIX = "fleet/v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
INGEST_SHARE_GROUP = "ingest"
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_RE.pattern)]


def check_device_id(device: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device):
        raise MalformedError(f"invalid device id {device[:70]!r}", reason="bad_device_id")
    return device


def upload(device: str) -> str:
    return f"{PREFIX}/{check_device_id(device)}/upload"


def ack(device: str) -> str:
    return f"{PREFIX}/{check_device_id(device)}/ack"


def events(device: str) -> str:
    return f"{PREFIX}/{check_device_id(device)}/events"


def telemetry(device: str) -> str:
    """Sound level and sysfs sensor readings (``fleet_protocol.telemetry``)."""
    return f"{PREFIX}/{check_device_id(device)}/telemetry"


def status(device: str) -> str:
    return f"{PREFIX}/{check_device_id(device)}/status"


def ota_status(device: str) -> str:
    return f"{PREFIX}/{check_device_id(device)}/ota/status"


def ota_metadata(channel: str, role: str) -> str:
    """Retained OTA metadata, e.g. ``fleet/v1/ota/stable/targets.json``."""
    return f"{PREFIX}/ota/{check_device_id(channel)}/{role}.json"


def ota_artifact(channel: str, name: str) -> str:
    """Retained OTA artifact published under its content hash."""
    return f"{PREFIX}/ota/{check_device_id(channel)}/artifacts/{name}"


def ota_subscription(channel: str) -> str:
    return f"{PREFIX}/ota/{check_device_id(channel)}/#"


LABELS_PREFIX = f"{PREFIX}/labels"


def labels(source: str) -> str:
    """Where a downstream label source publishes ``LabelBatch`` messages."""
    return f"{LABELS_PREFIX}/{check_device_id(source)}"


def labels_result(source: str) -> str:
    """Where the sidecar answers a label source with ``LabelResult`` messages."""
    return f"{labels(source)}/result"


def labels_subscription() -> str:
    """Shared subscription for the sidecar's workers: every source's label batches."""
    return f"$share/{INGEST_SHARE_GROUP}/{LABELS_PREFIX}/+"


def source_of_labels(topic: str) -> str:
    """The source id in ``fleet/v1/labels/<source>``; ``MalformedError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or "/".join(parts[:3]) != LABELS_PREFIX:
        raise MalformedError(f"not a labels topic: {topic[:120]!r}", reason="bad_topic")
    return check_device_id(parts[3])


def shared_upload_subscription() -> str:
    """Shared subscription for ingest workers: each upload goes to one worker."""
    return f"$share/{INGEST_SHARE_GROUP}/{PREFIX}/+/upload"


def device_of_upload(topic: str) -> str:
    """The device id in ``fleet/v1/<device>/upload``; raises ``MalformedError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[3] != "upload":
        raise MalformedError(f"not an upload topic: {topic[:120]!r}", reason="bad_topic")
    return check_device_id(parts[2])
