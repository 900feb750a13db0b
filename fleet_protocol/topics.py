"""MQTT topic names of protocol v1, their parsing, and the placeholders ACL rules use.

Owns every topic name the services publish to or subscribe to; ``fleet_protocol.acl``
builds the broker's ACL from these functions only, so the ACL and the code cannot
disagree about a name. Layout::

    fleet/v1/<device>/{upload,events,telemetry,ota/status,cert/request}   device writes
    fleet/v1/<device>/{ack,cert/response}                                 device reads
    fleet/v1/ota/<channel>/<role>.json, .../artifacts/<name>              OTA tree (read)
    fleet/v1/ota/<channel>/metadata/<N.role>.json                         TUF metadata (read)
    fleet/v1/<device>/ota/request (write), .../ota/response (read)        OTA chunk transfer
    fleet/v1/enroll/<claim id>/{request,response}                         enrollment
    fleet/v1/labels/<source>, fleet/v1/labels/<source>/result             label sources

Invariants:
- a device id is ``^[a-z0-9][a-z0-9-]{0,62}$``, equals the CN of the device's
  certificate and is none of ``RESERVED_DEVICE_IDS`` (the names of the subtrees beside
  the devices': a device called ``ota`` would own the OTA tree's topic levels);
- the broker's ACL lets a device write only under ``fleet/v1/<its id>/`` and read only
  its own ack and certificate response and the OTA tree, so the device id taken from
  a device topic (``device_of``) is authenticated by the broker: the cloud takes the
  device from the topic, never from a payload;
- a label source id follows the device id rule; a source writes only its own
  ``labels/<source>`` topic and reads only its own ``.../result``;
- a builder takes an id (checked) or, for a whole level, one of the placeholders
  ``ANY`` (``+``), ``USERNAME`` (Mosquitto's ``%u``: the certificate CN) or
  ``CLIENT_ID`` (``%c``). Only these constants are ``Wildcard`` instances, so no string
  from the wire passes as one; parsers never accept a placeholder.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

from fleet_protocol.errors import MalformedError

PREFIX = "fleet/v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CLAIM_ID_RE = re.compile(r"^[0-9a-f]{16}$")
INGEST_SHARE_GROUP = "ingest"
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_RE.pattern)]
ENROLL_SHARE_GROUP = "enroll"

# The levels beside the devices' under PREFIX; device ids may not take these names.
OTA = "ota"
ENROLL = "enroll"
LABELS = "labels"
RESERVED_DEVICE_IDS = frozenset({OTA, ENROLL, LABELS})

# Device topic kinds: fleet/v1/<device>/<kind>.
UPLOAD = "upload"
ACK = "ack"
EVENTS = "events"
TELEMETRY = "telemetry"
OTA_STATUS = "ota/status"
OTA_REQUEST = "ota/request"
OTA_RESPONSE = "ota/response"
CERT_REQUEST = "cert/request"
CERT_RESPONSE = "cert/response"
DEVICE_KINDS = (
    UPLOAD,
    ACK,
    EVENTS,
    TELEMETRY,
    OTA_STATUS,
    OTA_REQUEST,
    OTA_RESPONSE,
    CERT_REQUEST,
    CERT_RESPONSE,
)


class Wildcard(str):
    """A placeholder for one whole topic level (a subscription filter or an ACL rule)."""

    __slots__ = ()


ANY = Wildcard("+")
USERNAME = Wildcard("%u")  # Mosquitto ACL pattern: the client's username (= certificate CN)
CLIENT_ID = Wildcard(
    "%c"
)  # Mosquitto ACL pattern: the client id (= the session channel when enrolling)


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_ID_RE.fullmatch(device):
        raise MalformedError(f"invalid device id {str(device)[:70]!r}", reason="bad_device_id")
    return device


def check_source_id(source: str) -> str:
    """A label source id: the device id rule (it is a certificate CN as well)."""
    if not isinstance(source, str) or not DEVICE_ID_RE.fullmatch(source):
        raise MalformedError(f"invalid label source id {str(source)[:70]!r}", "bad_source_id")
    return source


def check_claim_id(claim_id: str) -> str:
    if not isinstance(claim_id, str) or not CLAIM_ID_RE.fullmatch(claim_id):
        raise MalformedError(f"invalid claim id {str(claim_id)[:40]!r}", "bad_claim_id")
    return claim_id


def _device(device: str) -> str:
    return device if isinstance(device, Wildcard) else check_device_id(device)


# -- device topics ------------------------------------------------------------------------


def device_topic(device: str, kind: str) -> str:
    """``fleet/v1/<device>/<kind>`` for one of ``DEVICE_KINDS``."""
    if kind not in DEVICE_KINDS:
        raise MalformedError(f"unknown device topic kind {kind[:40]!r}", "bad_topic")
    return f"{PREFIX}/{_device(device)}/{kind}"


def upload(device: str) -> str:
    """Sealed batches (``fleet_protocol.envelope``), device → cloud."""
    return device_topic(device, UPLOAD)


def ack(device: str) -> str:
    """``messages.Ack``, cloud → device."""
    return device_topic(device, ACK)


def events(device: str) -> str:
    """``messages.Event``, device → city and cloud."""
    return device_topic(device, EVENTS)


def telemetry(device: str) -> str:
    """Sound level and sysfs sensor readings (``fleet_protocol.telemetry``)."""
    return device_topic(device, TELEMETRY)


def ota_status(device: str) -> str:
    """``messages.OtaStatus``, device → cloud."""
    return device_topic(device, OTA_STATUS)


def cert_request(device: str) -> str:
    """``enroll.RenewRequest``, device → cloud over the device's own session."""
    return device_topic(device, CERT_REQUEST)


def cert_response(device: str) -> str:
    """``enroll.CertResponse`` to a renewal, cloud → device."""
    return device_topic(device, CERT_RESPONSE)


def device_of(topic: str, kind: str) -> str:
    """The device id in ``fleet/v1/<device>/<kind>``; ``MalformedError`` otherwise.

    Reason ``bad_topic`` when the topic is not of that kind, ``bad_device_id`` when the
    device level is not a valid (or is a reserved) device id.
    """
    head, tail = f"{PREFIX}/", f"/{kind}"
    if (
        kind not in DEVICE_KINDS
        or not topic.startswith(head)
        or not topic.endswith(tail)
        or len(topic) <= len(head) + len(tail)
    ):
        raise MalformedError(f"not a {kind[:20]} topic: {topic[:120]!r}", reason="bad_topic")
    device = check_device_id(topic[len(head) : -len(tail)])
    if device in RESERVED_DEVICE_IDS:
        raise MalformedError(f"{device!r} is not a device", reason="bad_device_id")
    return device


def device_of_upload(topic: str) -> str:
    """The device id in ``fleet/v1/<device>/upload``; raises ``MalformedError`` otherwise."""
    return device_of(topic, UPLOAD)


def kind_of(topic: str) -> str | None:
    """The device topic kind ``topic`` ends with (longest first), or None; no id check."""
    if not topic.startswith(f"{PREFIX}/"):
        return None
    for kind in sorted(DEVICE_KINDS, key=len, reverse=True):
        if topic.endswith(f"/{kind}"):
            return kind
    return None


# -- shared subscriptions -------------------------------------------------------------------


def shared(topic_filter: str, group: str = INGEST_SHARE_GROUP) -> str:
    """A shared subscription: each message on ``topic_filter`` goes to one group member."""
    return f"$share/{group}/{topic_filter}"


def shared_upload_subscription() -> str:
    """Shared subscription for ingest workers: each upload goes to one worker."""
    return shared(upload(ANY))


# -- OTA tree -----------------------------------------------------------------------------------


def ota_metadata(channel: str, role: str) -> str:
    """Retained OTA metadata, e.g. ``fleet/v1/ota/stable/targets.json``.

    With ``role=ANY`` the whole last level is the wildcard (``fleet/v1/ota/<ch>/+``).
    """
    leaf = role if isinstance(role, Wildcard) else f"{role}.json"
    return f"{PREFIX}/{OTA}/{_device(channel)}/{leaf}"


def ota_artifact(channel: str, name: str) -> str:
    """Retained OTA artifact published under its content hash."""
    return f"{PREFIX}/{OTA}/{_device(channel)}/artifacts/{name}"


TUF_METADATA_FILE_RE = re.compile(
    r"^(?:[1-9][0-9]{0,9}\.)?(?:root|targets|snapshot|timestamp)\.json$"
)


def ota_tuf_metadata(channel: str, filename: str) -> str:
    """Retained TUF metadata file, e.g. ``fleet/v1/ota/stable/metadata/3.targets.json``."""
    if not isinstance(filename, Wildcard) and not TUF_METADATA_FILE_RE.fullmatch(filename):
        raise MalformedError(f"not a TUF metadata file name: {filename[:40]!r}", "bad_topic")
    return f"{PREFIX}/{OTA}/{_device(channel)}/metadata/{filename}"


def ota_request(device: str) -> str:
    """Chunk requests (``fleet_protocol.ota_transfer``), device → cloud (MQTT 5 request)."""
    return device_topic(device, OTA_REQUEST)


def ota_response(device: str) -> str:
    """Chunk responses, cloud → device (the request's response topic)."""
    return device_topic(device, OTA_RESPONSE)


def ota_subscription(channel: str) -> str:
    return f"{PREFIX}/{OTA}/{_device(channel)}/#"


# -- enrollment (fleet_protocol.enroll) ------------------------------------------------------


def _claim(claim_id: str) -> str:
    return claim_id if isinstance(claim_id, Wildcard) else check_claim_id(claim_id)


def enroll_request(claim_id: str) -> str:
    """``enroll.EnrollRequest``, claim holder → cloud on its session channel (its client id:
    ``enroll.session_channel``; a random channel for re-enrollment)."""
    return f"{PREFIX}/{ENROLL}/{_claim(claim_id)}/request"


def enroll_response(claim_id: str) -> str:
    """``enroll.CertResponse`` to an enrollment, cloud → claim holder."""
    return f"{PREFIX}/{ENROLL}/{_claim(claim_id)}/response"


def enroll_subscription() -> str:
    return shared(enroll_request(ANY), ENROLL_SHARE_GROUP)


def renew_subscription() -> str:
    return shared(cert_request(ANY), ENROLL_SHARE_GROUP)


def is_enroll_topic(topic: str) -> bool:
    return topic.startswith(f"{PREFIX}/{ENROLL}/")


def claim_of_enroll_request(topic: str) -> str:
    """The claim id in ``fleet/v1/enroll/<claim>/request``; ``MalformedError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/{ENROLL}" or parts[4] != "request":
        raise MalformedError(f"not an enrollment topic: {topic[:120]!r}", "bad_topic")
    return check_claim_id(parts[3])


# -- label sources ------------------------------------------------------------------------------


def _source(source: str) -> str:
    return source if isinstance(source, Wildcard) else check_source_id(source)


def labels(source: str) -> str:
    """``fleet/v1/labels/<source>``: a downstream system's labels, source → cloud."""
    return f"{PREFIX}/{LABELS}/{_source(source)}"


def labels_result(source: str) -> str:
    """``fleet/v1/labels/<source>/result``: the sidecar's answer, cloud → source."""
    return f"{labels(source)}/result"


def labels_subscription() -> str:
    """``$share/ingest/fleet/v1/labels/+``: each label message goes to one sidecar worker."""
    return shared(labels(ANY))


def is_labels_topic(topic: str) -> bool:
    return topic.startswith(f"{PREFIX}/{LABELS}/")


def source_of_labels(topic: str) -> str:
    """The source id in ``fleet/v1/labels/<source>``; ``MalformedError`` otherwise."""
    head = f"{PREFIX}/{LABELS}/"
    if not topic.startswith(head) or "/" in topic[len(head) :]:
        raise MalformedError(f"not a labels topic: {topic[:120]!r}", "bad_topic")
    return check_source_id(topic[len(head) :])
