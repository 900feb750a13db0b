"""ECDSA P-256 signatures in one encoding only: strict DER with a low S (sans-IO).

An ECDSA signature ``(r, s)`` verifies as ``(r, n - s)`` too. Whoever relays a signed
message (the broker) could re-encode it into a second valid form, so a message would
have two byte representations and two digests: a resend and a replay would look alike
or differ at the relay's choice (issue 9). Invariants:

- ``normalize`` returns the strict-DER encoding with ``s <= n/2`` of any DER signature
  (signers call it on what the TPM or HSM returned);
- ``check`` refuses (``MalformedError(bad_signature)``) anything but strict DER with a
  low S, so each signed message has exactly one accepted encoding.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import utils

from fleet_protocol.errors import MalformedError

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
HALF_ORDER = P256_ORDER // 2


def normalize(der: bytes) -> bytes:
    """The low-S strict-DER form of a DER ECDSA P-256 signature."""
    try:
        r, s = utils.decode_dss_signature(der)
    except ValueError as e:
        raise MalformedError("signature is not a DER ECDSA signature", "bad_signature") from e
    if s > HALF_ORDER:
        s = P256_ORDER - s
    return utils.encode_dss_signature(r, s)


def check(der: bytes) -> tuple[int, int]:
    """``(r, s)`` of a strict-DER, low-S signature, else ``MalformedError``."""
    try:
        r, s = utils.decode_dss_signature(der)
    except ValueError as e:
        raise MalformedError("signature is not a DER ECDSA signature", "bad_signature") from e
    if utils.encode_dss_signature(r, s) != der:
        raise MalformedError("signature is not strict DER", "bad_signature")
    if not 0 < s <= HALF_ORDER:
        raise MalformedError("signature S is not low (malleable encoding)", "bad_signature")
    return r, s


__all__ = ["HALF_ORDER", "P256_ORDER", "check", "normalize"]
