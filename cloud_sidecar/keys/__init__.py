"""Cloud key custody: the upload-unwrap and OTA-signing keys in a PKCS#11 HSM.

Public surface: ``Hsm`` and the key labels (see ``cloud_sidecar.keys.hsm``).
"""

from cloud_sidecar.keys.hsm import SIGNING_LABEL, UNWRAP_LABEL, Hsm

__all__ = ["SIGNING_LABEL", "UNWRAP_LABEL", "Hsm"]
