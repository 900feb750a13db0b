"""All edge_daemon exceptions. Root: ``EdgeError``."""


class EdgeError(Exception):
    """Root of every edge daemon failure."""


class ConfigError(EdgeError):
    """The daemon's configuration is invalid; the message names the field."""


class KeyStoreError(EdgeError):
    """The TPM (or its simulator) failed or is unreachable."""


class CaptureError(EdgeError):
    """An audio source failed: missing device, wrong format, corrupt file."""


class InferenceError(EdgeError):
    """A model could not be loaded or run."""


class BufferError_(EdgeError):
    """The replay buffer failed (I/O, schema, decryption)."""


class UplinkError(EdgeError):
    """The MQTT uplink failed (connection, TLS, publish)."""


class OtaError(EdgeError):
    """An update was rejected or could not be applied; the running model is unchanged."""


class OtaRefusedError(OtaError):
    """Update metadata or an artifact was refused; ``reason`` names the check (for status)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OtaTransferError(OtaError):
    """A chunked transfer failed (no answer, bad chunk, over its bound); retried with backoff."""


class OtaStateError(OtaError):
    """The OTA state on the card failed its integrity check, or a write over it was refused."""


class EnrollmentError(EdgeError):
    """Enrollment or certificate renewal failed (refused, no answer, unusable certificate)."""

    def __init__(self, message: str, reason: str = "enrollment_failed") -> None:
        super().__init__(message)
        self.reason = reason


class BackendUnavailableError(InferenceError):
    """The configured inference backend cannot run here: its library or hardware is absent."""
