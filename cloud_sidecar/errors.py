"""All cloud_sidecar exceptions. Root: ``CloudError``."""


class CloudError(Exception):
    """Root of every sidecar failure."""


class ConfigError(CloudError):
    """The sidecar's configuration is invalid; the message names the field."""


class HsmError(CloudError):
    """The PKCS#11 token failed or is unreachable (key missing, login, mechanism)."""


class HsmPinError(HsmError):
    """The token refused the PIN. Never retried: every further try brings the token closer
    to locking the user PIN (issue 9); an operator must fix the credential."""


class HsmUnavailableError(HsmError):
    """The token cannot be reached now; ingest stops acknowledging and retries."""


class StoreError(CloudError):
    """The sample store failed."""


class TrainingError(CloudError):
    """Dataset building or training failed."""


class DatasetError(TrainingError):
    """A pretraining dataset cannot be read; the message names the file and the fix.

    ``path`` is the offending file or directory (empty when the dataset as a whole is
    at fault, e.g. no usable windows).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class GateRejectedError(CloudError):
    """A candidate adapter did not pass the evaluation gate."""


class RepositoryError(CloudError):
    """OTA repository state that is not backed by verified signed metadata, or an artifact
    that does not match what was gated or signed: nothing is signed."""


class AuditError(CloudError):
    """The audit log is inconsistent (edited, deleted or reordered entries)."""


class HsmDecryptError(HsmError, ValueError):
    """The token refused to decrypt: the data was not encrypted for this key, or is corrupt.

    Also a ``ValueError``, so ``fleet_protocol.envelope.open_envelope`` reports it as a
    ``DecryptError`` (reject the upload) and not as an unreachable token (retry).
    ``transient`` is True when the token's answer does not prove the data bad
    (``CKR_GENERAL_ERROR``): ingest then keeps the batch on the device (docs/adr/0017).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TransientIngestError(CloudError):
    """An upload cannot be stored now but may be later (unknown unwrap key, a token error
    that does not prove the data bad, a full disk): the device keeps it and resends.
    ``reason`` is the ack's and the metric's label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResidencyError(ConfigError):
    """An endpoint declares a region outside the residency policy; names the endpoint."""

    def __init__(self, message: str, endpoint: str = "", region: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.region = region


class LabelError(CloudError):
    """A label import was refused as a whole; ``problems`` holds (record index, reason,
    message) for each record at fault (index -1: the import itself)."""

    def __init__(self, message: str, problems: list[tuple[int, str, str]]) -> None:
        super().__init__(message)
        self.problems = problems
