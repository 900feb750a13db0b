"""Proof that an enrolling identity key lives in a TPM: credential activation (issue 9).

Owns the cloud half of ``TPM2_MakeCredential``/``TPM2_ActivateCredential``: checking the
EK certificate a request presents against the configured EK issuer certificates
(``fleet.ek_ca_certs``: the TPM manufacturers' CAs; devstack's swtpm_localca), checking
that the identity key's TPM public area is a P-256 signing key that cannot leave its TPM
(fixedTPM, fixedParent, sensitiveDataOrigin; no decrypt) and is the key the request
presents, and sealing a random secret to that EK and that key's Name. Only a TPM that
holds both can recover the secret, so a key made in software, or in another TPM, cannot
answer the challenge; the CA certifies only keys that answered.

Invariants: every failure is a ``ProtocolError`` with a reason (``bad_ek_certificate``,
``bad_identity_public``); nothing here keeps state (``FleetService`` keeps the pending
challenges); only RSA-2048 EKs with the TCG default template are accepted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.internal.templates import ek_rsa2048
from tpm2_pytss.types import TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential

from fleet_protocol.errors import MalformedError, SignatureError

SECRET_BYTES = 32
_RESIDENT = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN


@dataclass(frozen=True)
class Challenge:
    credential_blob: str  # base64 TPM2B_ID_OBJECT
    encrypted_secret: str  # base64 TPM2B_ENCRYPTED_SECRET
    secret: bytes  # what the device must send back


def check_ek_certificate(pem: str, issuers: Sequence[x509.Certificate]) -> rsa.RSAPublicKey:
    """The EK's RSA-2048 public key, if a configured issuer signed its certificate."""
    if not pem:
        raise SignatureError("the request carries no EK certificate", "no_ek_certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        key = cert.public_key()
    except (ValueError, UnicodeError, UnsupportedAlgorithm) as e:
        raise MalformedError("EK certificate does not parse", "bad_ek_certificate") from e
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 2048:
        raise MalformedError("EK is not RSA-2048", "bad_ek_certificate")
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
            return key
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise SignatureError(
        "EK certificate is not from a trusted TPM manufacturer", "bad_ek_certificate"
    )


def identity_name(public_b64: str, identity_key: ec.EllipticCurvePublicKey) -> bytes:
    """The TPM Name of the identity key's public area, after checking what it says."""
    try:
        public, used = TPM2B_PUBLIC.unmarshal(base64.b64decode(public_b64, validate=True))
    except (binascii.Error, ValueError, TypeError, RuntimeError, Exception) as e:  # TSS2 errors
        raise MalformedError("identity_public is not a TPM2B_PUBLIC", "bad_identity_public") from e
    area = public.publicArea
    attrs = int(area.objectAttributes)
    if (
        used != len(base64.b64decode(public_b64))
        or area.type != TPM2_ALG.ECC
        or area.nameAlg != TPM2_ALG.SHA256
        or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256
        or attrs & _RESIDENT != _RESIDENT
        or not attrs & TPMA_OBJECT.SIGN_ENCRYPT
        or attrs & TPMA_OBJECT.DECRYPT
    ):
        raise MalformedError(
            "identity key is not a TPM-resident P-256 signing key", "bad_identity_public"
        )
    numbers = identity_key.public_numbers()
    x, y = bytes(area.unique.ecc.x), bytes(area.unique.ecc.y)
    if int.from_bytes(x, "big") != numbers.x or int.from_bytes(y, "big") != numbers.y:
        raise MalformedError("identity_public is another key", "bad_identity_public")
    return bytes(public.get_name().marshal())


def challenge(ek: rsa.RSAPublicKey, name: bytes) -> Challenge:
    """A fresh secret sealed to ``ek`` and the object named ``name`` (MakeCredential)."""
    from tpm2_pytss.types import TPM2B_NAME

    public, _ = TPM2B_PUBLIC.unmarshal(ek_rsa2048.template.marshal())  # a copy
    public.publicArea.unique.rsa = ek.public_numbers().n.to_bytes(256, "big")
    tpm_name, _ = TPM2B_NAME.unmarshal(name)
    secret = secrets.token_bytes(SECRET_BYTES)
    blob, enc = make_credential(public, secret, tpm_name)
    return Challenge(
        base64.b64encode(bytes(blob.marshal())).decode(),
        base64.b64encode(bytes(enc.marshal())).decode(),
        secret,
    )


@dataclass
class _Pending:
    request: Any
    csr: Any
    record: str
    secret: bytes
    expires: float


class PendingChallenges:
    """Challenges sent and not yet answered: at most ``max_items``, each for ``ttl_s``.

    A request may be resent while its challenge is out (the device resends until it
    gets an answer): the latest challenge for a (claim, nonce) replaces the earlier one.
    """

    def __init__(self, max_items: int = 256, ttl_s: float = 120.0) -> None:
        self._items: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._lock = threading.Lock()
        self._max, self._ttl = max_items, ttl_s

    def put(
        self, claim_id: str, nonce: str, request: Any, csr: Any, record: str, secret: bytes
    ) -> None:
        with self._lock:
            self._items.pop((claim_id, nonce), None)
            self._items[(claim_id, nonce)] = _Pending(
                request, csr, record, secret, time.monotonic() + self._ttl
            )
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def take(self, claim_id: str, nonce: str, device_id: str, secret: bytes) -> _Pending:
        """The pending enrollment this proof answers; ``SignatureError`` if none does."""
        with self._lock:
            pending = self._items.pop((claim_id, nonce), None)
        if pending is None or pending.expires < time.monotonic():
            raise SignatureError("no challenge is pending for this proof", "unknown_challenge")
        if pending.request.device_id != device_id or not hmac.compare_digest(
            pending.secret, secret
        ):
            raise SignatureError("credential activation failed", "activation_failed")
        return pending


__all__ = ["Challenge", "PendingChallenges", "challenge", "check_ek_certificate", "identity_name"]
