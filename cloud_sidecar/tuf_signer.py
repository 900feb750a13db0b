"""Signers for the TUF repository: the HSM's online role keys, and offline root keys on files.

``HsmSigner`` is a securesystemslib ``Signer`` whose private operation is the HSM's
``sign_digest`` (``cloud_sidecar.keys.hsm.Hsm.sign_digest``): SHA-256 of the canonical
payload computed here, ``CKM_ECDSA`` over the digest inside the token (SoftHSM 2.6.1 has
no ``CKM_ECDSA_SHA256``; docs/adr/0002), DER signature out. The result is exactly
what the ``ecdsa-sha2-nistp256`` scheme verifies, so a stock TUF client accepts it.

``FileRootKeys`` holds the offline root keys of a development repository as PEM files
(mode 0600) in one directory. In production the root keys stay offline (hardware
tokens, 2 of 3, docs/adr/0016); only the demo and the tests keep them on disk.

Invariants: no private key of the online roles exists outside the HSM; ``HsmSigner``
refuses a public key that is not EC P-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, Key, Signature, Signer, SSlibKey

from cloud_sidecar.errors import ConfigError
from fleet_protocol.io.files import write_atomic

SCHEME = "ecdsa-sha2-nistp256"


class HsmSigner(Signer):
    """The online roles' signer: the digest here, the private operation in the HSM."""

    def __init__(self, public_pem: bytes, sign_digest: Callable[[bytes], bytes]) -> None:
        key = serialization.load_pem_public_key(public_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ConfigError("the OTA signing key must be EC P-256")
        self._public = SSlibKey.from_crypto(key, scheme=SCHEME)
        self._sign_digest = sign_digest

    @property
    def public_key(self) -> Key:
        return self._public

    def sign(self, payload: bytes) -> Signature:
        der = self._sign_digest(hashlib.sha256(payload).digest())
        return Signature(self._public.keyid, der.hex())

    @classmethod
    def from_priv_key_uri(
        cls, priv_key_uri: str, public_key: Key, secrets_handler: Any = None
    ) -> Signer:
        raise ConfigError("HsmSigner is built from an open Hsm, not from a URI")


class FileRootKeys:
    """``count`` EC P-256 root keys as ``root-<i>.pem`` files (development only)."""

    def __init__(self, directory: Path, count: int = 3) -> None:
        self.dir = directory
        self.count = count

    def ensure(self) -> list[Signer]:
        signers = []
        for i in range(1, self.count + 1):
            path = self.dir / f"root-{i}.pem"
            if not path.exists():
                private = ec.generate_private_key(ec.SECP256R1())
                pem = private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                write_atomic(path, pem, 0o600)
            signers.append(self.load(path))
        return signers

    @staticmethod
    def load(path: Path) -> Signer:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path} is not an EC private key")
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), scheme=SCHEME))
