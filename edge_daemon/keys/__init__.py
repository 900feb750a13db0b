"""Device key custody: the TPM-held signing key and the TPM-sealed storage key.

Public surface: ``TpmKeyStore`` (see ``edge_daemon.keys.tpm``). No torch here.
"""

from edge_daemon.keys.tpm import TpmKeyStore

__all__ = ["TpmKeyStore"]
