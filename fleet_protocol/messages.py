"""Small JSON control messages: acks, OTA status, events.

Each is a ``WireModel`` (fleet_protocol/wire.py): frozen, strict, exactly its fields,
``to_bytes`` canonical and ``from_bytes`` capped at ``MAX_CONTROL_BYTES``, raising only
``ProtocolError`` subclasses. ``OtaStatus`` and ``Event`` are ``DeviceMessage``s: the
cloud parses them with ``wire.parse_device_message``, which refuses a payload naming
another device than its topic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pydantic import AfterValidator, ConfigDict, Field

from fleet_protocol import topics
from fleet_protocol.errors import MalformedError, SignatureError
from fleet_protocol.labels import CLASSES, LABELS_VERSION
from fleet_protocol.wire import (
    DEFAULT_MAX_BYTES,
    DeviceMessage,
    ReasonCode,
    Sha256Hex,
    UInt63,
    WireModel,
    canonical_json,
)

MAX_CONTROL_BYTES = DEFAULT_MAX_BYTES


def _known_label(label: str) -> str:
    if label not in CLASSES:
        raise ValueError(f"not a label of {LABELS_VERSION}")
    return label


EventLabel = Annotated[
    str,
    AfterValidator(_known_label),
    Field(
        max_length=32,
        json_schema_extra={"enum": list(CLASSES)},
        description=f"the predicted class, from {LABELS_VERSION} (fleet_protocol.labels.CLASSES)",
    ),
]


AckStatus = Literal["stored", "rejected", "retry"]
# applied/rejected/failed: the single-slot client (edge_daemon/ota.py); the rest: the
# two-slot TUF client (edge_daemon/ota_slots.py, docs/adr/0016), in lifecycle order.
OtaState = Literal[
    "applied",
    "rejected",
    "failed",
    "queued",
    "downloading",
    "verifying",
    "staged",
    "active",
    "confirmed",
    "rolled_back",
]

ACK_CONTEXT = b"sovereign-edge ack v1\n"  # domain separation: an ack signature signs nothing else
_ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


class Ack(WireModel):
    """Cloud → device on ``fleet/v1/<device>/ack``, signed by the sidecar's ack key.

    ``status``: ``stored`` (stored now or before: delete it), ``rejected`` (permanent:
    forged, malformed, a replay or a stale sequence; the batch can never be stored:
    drop it and count it) or ``retry`` (transient: an unwrap key this sidecar does not
    hold yet, a token error, a full disk: keep it and resend with backoff). ``digest``
    is the SHA-256 of the exact envelope bytes the ack is about; the device acts only on
    an ack whose signature verifies under its pinned ack key and whose digest is that of
    the envelope it holds for ``batch_id`` (docs/adr/0017).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "batch_id": "0f" * 16,
                    "digest": "3f" * 32,
                    "kid": "0123456789abcdef",
                    "reason": "",
                    "seq": 7,
                    "sig": "MEUCIQ" + "A" * 90,
                    "status": "stored",
                },
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = MAX_CONTROL_BYTES

    batch_id: Annotated[
        str, Field(pattern=r"^[0-9a-f]{32}$", description="the envelope header's batch id")
    ]
    seq: Annotated[UInt63, Field(description="the envelope header's sequence number")]
    status: AckStatus
    reason: Annotated[
        ReasonCode,
        Field(description="why it was rejected or deferred (ProtocolError.reason), or empty"),
    ]
    digest: Annotated[Sha256Hex, Field(description="SHA-256 of the envelope bytes acknowledged")]
    kid: Annotated[
        str, Field(pattern=r"^[0-9a-f]{16}$", description="key id of the sidecar's ack key")
    ]
    sig: Annotated[
        str,
        Field(
            max_length=112,
            pattern=r"^[A-Za-z0-9+/]*={0,2}$",
            description="base64 DER ECDSA P-256 over SHA-256(ACK_CONTEXT || the ack without"
            " sig as canonical JSON); empty: unsigned (never acted on)",
        ),
    ] = ""

    def signed_digest(self) -> bytes:
        """What the ack key signs: SHA-256(ACK_CONTEXT || canonical JSON without ``sig``)."""
        body = self.model_copy(update={"sig": ""}).model_dump(mode="json")
        del body["sig"]
        return hashlib.sha256(ACK_CONTEXT + canonical_json(body)).digest()

    def signed(self, sign_digest: Callable[[bytes], bytes]) -> Ack:
        """This ack with ``sig`` set by ``sign_digest`` (the HSM's ack key)."""
        sig = base64.b64encode(sign_digest(self.signed_digest())).decode("ascii")
        return self.model_copy(update={"sig": sig})

    def verify(self, public_key_pem: bytes) -> None:
        """Raise ``SignatureError`` unless the ack key in ``public_key_pem`` signed this ack."""
        try:
            key = serialization.load_pem_public_key(public_key_pem)
        except (ValueError, TypeError) as e:
            raise MalformedError(f"not a PEM public key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise MalformedError("the ack key must be EC P-256")
        if not self.sig:
            raise SignatureError("ack is not signed", "unsigned_ack")
        try:
            der = base64.b64decode(self.sig, validate=True)
            key.verify(der, self.signed_digest(), _ECDSA_PREHASHED)
        except (InvalidSignature, ValueError, binascii.Error) as e:
            raise SignatureError("ack signature does not verify", "bad_ack_signature") from e


class OtaStatus(DeviceMessage):
    """Device → cloud on ``fleet/v1/<device>/ota/status``: the outcome of an update attempt."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adapter_version": 3,
                    "device": "edge-01",
                    "metadata_version": 5,
                    "model_sha256": "",
                    "reason": "bad_hash",
                    "state": "rejected",
                }
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = MAX_CONTROL_BYTES
    TOPIC_KIND: ClassVar[str] = topics.OTA_STATUS

    metadata_version: Annotated[UInt63, Field(description="targets metadata version (0: none)")]
    adapter_version: Annotated[UInt63, Field(description="adapter version tried (0: none)")]
    state: OtaState
    reason: Annotated[
        str,
        Field(
            max_length=64,
            pattern=r"^[A-Za-z0-9_]*$",
            description="a ProtocolError reason (rejected), an error type name (failed), or empty",
        ),
    ]
    model_sha256: Annotated[
        str,
        Field(pattern=r"^([0-9a-f]{64})?$", description="the model now running, or empty"),
    ]


class Event(DeviceMessage):
    """One classification at or above the device's event threshold (``model.event_threshold``),
    published with QoS 0 on ``fleet/v1/<device>/events``. Events never carry audio or
    features."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device": "edge-01",
                    "label": "siren",
                    "model_sha256": "3f1c0e5a9b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e",
                    "score": 0.9312,
                    "time_ms": 1763800000000,
                }
            ]
        }
    )
    MAX_BYTES: ClassVar[int] = MAX_CONTROL_BYTES
    TOPIC_KIND: ClassVar[str] = topics.EVENTS

    time_ms: Annotated[
        UInt63,
        Field(description="when the device classified the window: Unix ms, device clock"),
    ]
    label: EventLabel
    score: Annotated[
        float,
        Field(ge=0, le=1, description="the model's probability for label, rounded to 4 decimals"),
    ]
    model_sha256: Annotated[
        Sha256Hex,
        Field(description="sha256 of exactly the model bytes the inference runtime executed"),
    ]


__all__ = [
    "ACK_CONTEXT",
    "MAX_CONTROL_BYTES",
    "Ack",
    "AckStatus",
    "Event",
    "EventLabel",
    "OtaState",
    "OtaStatus",
]
