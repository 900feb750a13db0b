"""All fleet_protocol exceptions. Root: ``ProtocolError``.

Every rejection carries a short machine-readable ``reason`` used as the metric label
and in the audit log.
"""


class ProtocolError(Exception):
    """Root of every contract violation found in bytes from the other side."""

    reason = "protocol"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TooLargeError(ProtocolError):
    """An input exceeds its byte cap."""

    reason = "too_large"


class MalformedError(ProtocolError):
    """An input does not parse, or a field has the wrong type, length or range."""

    reason = "malformed"


class UnsupportedAlgorithmError(ProtocolError):
    """An algorithm or format identifier this version does not accept."""

    reason = "unknown_algorithm"


class SignatureError(ProtocolError):
    """A signature does not verify."""

    reason = "bad_signature"


class DecryptError(ProtocolError):
    """AEAD authentication failed: tampered header or ciphertext, or the wrong key."""

    reason = "decrypt_failed"


class ReplayError(ProtocolError):
    """A batch id was seen before, or a sequence number is not newer than the last."""

    reason = "replay"


class MetadataError(ProtocolError):
    """OTA metadata fails verification (signature, expiry, version, hash or length)."""

    reason = "bad_metadata"
