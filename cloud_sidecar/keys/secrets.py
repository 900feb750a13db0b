"""The token's secret (symmetric) keys: which exist, what each may do, and how one is made.

Owns: ``SECRETS`` (label -> key type, bits, the one use it has) and ``secret_key``,
which finds a secret in the token or generates it there on first use. ``claim-mac``
(HMAC-SHA256, sign/verify: binds claim records, cloud_sidecar/fleet.py) and
``store-kek`` (AES-256, encrypt/decrypt: wraps the cloud store's data keys,
docs/adr/0022) are used only through ``cloud_sidecar.keys.hsm.Hsm``.

Invariants: a secret is generated inside the token as a private, sensitive,
non-extractable token object with exactly the uses ``SECRETS`` gives it (every other
use switched off); an existing secret that is extractable or not sensitive is refused;
two objects under one label are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

from cloud_sidecar.errors import HsmError

log = logging.getLogger(__name__)

CLAIM_MAC_LABEL = "claim-mac"  # HMAC-SHA256 secret: binds claim records (cloud_sidecar/fleet.py)
STORE_KEK_LABEL = "store-kek"  # AES-256: wraps the cloud store's data keys (docs/adr/0022)
SECRETS = {
    CLAIM_MAC_LABEL: (KeyType.GENERIC_SECRET, 256, MechanismFlag.SIGN | MechanismFlag.VERIFY),
    STORE_KEK_LABEL: (KeyType.AES, 256, MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT),
}
_USES = (  # every use a secret has not been given is switched off in the token
    (MechanismFlag.SIGN, Attribute.SIGN),
    (MechanismFlag.VERIFY, Attribute.VERIFY),
    (MechanismFlag.ENCRYPT, Attribute.ENCRYPT),
    (MechanismFlag.DECRYPT, Attribute.DECRYPT),
    (MechanismFlag.WRAP, Attribute.WRAP),
    (MechanismFlag.UNWRAP, Attribute.UNWRAP),
    (MechanismFlag.DERIVE, Attribute.DERIVE),
)


def secret_key(session: pkcs11.Session, label: str) -> Any:
    """The token's secret key ``label`` (``SECRETS``), generated there on first use."""
    key_type, bits, uses = SECRETS[label]
    found = list(
        session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
    )
    if len(found) > 1:
        raise HsmError(f"token holds {len(found)} secret keys {label!r}")
    if not found:
        log.info("generating %s secret %r in the token", key_type.name, label)
        return session.generate_key(
            key_type,
            bits,
            label=label,
            id=label.encode(),
            store=True,
            capabilities=uses,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                **{attr: bool(uses & flag) for flag, attr in _USES},
            },
        )
    key = found[0]
    attrs = key.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE])
    if not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE]:
        raise HsmError(f"secret {label!r} is extractable; refusing it")
    return key


__all__ = ["CLAIM_MAC_LABEL", "SECRETS", "STORE_KEK_LABEL", "secret_key"]
