"""The cloud's key custody: upload-unwrap, OTA-signing, fleet-CA, ack and TUF role keys in an HSM.

Owns: the PKCS#11 session (python-pkcs11) on one token, generating the keypairs inside
the token, exporting their public halves, and the private operations the sidecar
needs: RSA-OAEP(SHA-1) ``C_Decrypt`` of a batch key and ``CKM_ECDSA`` over a SHA-256
digest (docs/adr/0002) with the OTA-signing key, the fleet CA key (docs/adr/0007), the
ack-signing key (docs/adr/0017) or one TUF online role's key (``TUF_ROLE_LABELS``:
targets, snapshot, timestamp, one key each, docs/adr/0016); with the token's secrets
(cloud_sidecar/keys/secrets.py) claim MACs and ``CKM_AES_GCM`` sealing of the cloud
store's data keys (docs/adr/0022).

``rotate_key`` relabels a key ``<label>.<key id>`` and generates a new ``<label>``: a retired
unwrap key still decrypts (``decrypt_oaep(wrapped, key_id)``, ADR 0002), a retired signing key
signs nothing more.

Invariants:
- private keys are generated in the token as sensitive, non-extractable, private
  token objects, each with exactly one use (unwrap: decrypt only; signing: sign
  only); existing keys without these attributes are refused, never used;
- no private key material crosses this module's boundary, only results;
- every pkcs11 failure surfaces as ``HsmError``; an unreachable module or token as
  ``HsmUnavailableError`` (callers retry); a refused PIN as ``HsmPinError``, once: the
  PIN is remembered (as a hash) and never presented to the token again in this
  process, so no retry loop can lock the token; data that is not encrypted for the
  unwrap key as ``HsmDecryptError`` (callers reject the upload), except
  ``CKR_GENERAL_ERROR`` from a token that still answers, which SoftHSM 2.6 gives for an
  OAEP decoding failure and a failing token gives too, and a key handle that went
  invalid while the token answers (the key object briefly away: every cached handle is
  dropped and looked up again on the next call): ``HsmDecryptError`` with
  ``transient=True`` (callers keep the batch for later, never drop it);
- all ``Hsm`` objects on a token share one logged-in session, and its lock serialises
  their calls. The PKCS#11 library is loaded once per process; it reads its configuration
  (``SOFTHSM2_CONF``) when initialised, so the environment must be set before the first
  ``Hsm`` is constructed. When no
  ``Hsm`` is open and the configuration changed or the token is not found, the
  library is re-initialised once to pick up the new configuration; likewise after a
  key was not found or its handle died (a key object that comes back is seen again).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import DecryptMixin, SignMixin
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from cloud_sidecar.errors import HsmDecryptError, HsmError, HsmPinError, HsmUnavailableError
from cloud_sidecar.keys.pkcs11_errors import (
    BAD_CIPHERTEXT as _BAD_CIPHERTEXT,
)
from cloud_sidecar.keys.pkcs11_errors import (
    HANDLE_GONE as _HANDLE_GONE,
)
from cloud_sidecar.keys.pkcs11_errors import (
    PIN_REFUSED as _PIN_REFUSED,
)
from cloud_sidecar.keys.pkcs11_errors import (
    UNAVAILABLE as _UNAVAILABLE,
)
from cloud_sidecar.keys.secrets import CLAIM_MAC_LABEL, SECRETS, STORE_KEK_LABEL, secret_key
from fleet_protocol.envelope import key_id_from_pem

log = logging.getLogger(__name__)

UNWRAP_LABEL = "upload-unwrap"
SIGNING_LABEL = "ota-signing"
CA_LABEL = "fleet-ca"
ACK_LABEL = "ack-signing"
TUF_ROLES = ("targets", "snapshot", "timestamp")  # one key each (ADR 0016)
TUF_ROLE_LABELS = {role: f"tuf-{role}" for role in TUF_ROLES}
EC_SIGN_LABELS = (SIGNING_LABEL, CA_LABEL, ACK_LABEL, *TUF_ROLE_LABELS.values())  # sign only
UNWRAP_RSA_BITS = 3072
DIGEST_BYTES = 32

_OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)
_CONF_ENV = "SOFTHSM2_CONF"
_T = TypeVar("_T")

# Process-wide library state. PKCS#11 login is per application and token, not per
# session, and closing the session that logged in logs every session out: so all
# ``Hsm`` objects on one token share one logged-in session (and its lock). A later
# ``Hsm`` must present the same PIN (compared as SHA-256; the PIN is not kept).
_LIB_LOCK = threading.Lock()
_lib_conf: dict[str, str | None] = {}
# (module, token, SHA-256(PIN)) the token refused: never presented to it again
_refused_pins: set[tuple[str, str, bytes]] = set()


@dataclass
class _Shared:
    session: pkcs11.Session
    lock: threading.Lock
    pin_hash: bytes
    users: int


_shared: dict[tuple[str, str], _Shared] = {}
# Modules whose view of a token went stale (a key handle died, a key was not found): the
# next first session re-initialises the library, so a key that came back is seen again.
_stale: set[str] = set()

_PRIVATE_COMMON: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN_RECOVER: False,
    Attribute.DERIVE: False,
}


@dataclass(frozen=True)
class _KeyPair:
    private: pkcs11.PrivateKey
    public_pem: bytes
    key_id: str
    size_bytes: int


def _acquire(module: str, token_label: str, user_pin: str) -> _Shared:
    """The logged-in session on ``token_label``: opened now, or shared with other users."""
    with _LIB_LOCK:
        key = (module, token_label)
        pin_hash = hashlib.sha256(user_pin.encode()).digest()
        if (module, token_label, pin_hash) in _refused_pins:
            raise HsmPinError(
                f"token {token_label!r} refused this PIN before; not trying it again (the"
                " token would lock): fix the hsm-pin credential and restart"
            )
        shared = _shared.get(key)
        if shared is not None:
            if not hmac.compare_digest(pin_hash, shared.pin_hash):
                raise HsmPinError(f"login to token {token_label!r} failed: wrong PIN")
            shared.users += 1
            return shared
        conf = os.environ.get(_CONF_ENV)
        lib = pkcs11.lib(module)
        idle = not any(m == module for m, _ in _shared)
        if module in _lib_conf and _lib_conf[module] != conf:
            if not idle:
                raise HsmUnavailableError(
                    f"{module} is in use with another {_CONF_ENV} in this process"
                )
            log.debug("re-initialising %s for %s=%s", module, _CONF_ENV, conf)
            lib.reinitialize()
        _lib_conf[module] = conf
        if idle and module in _stale:
            log.debug("re-initialising %s: a key went missing since it was last read", module)
            lib.reinitialize()
            _stale.discard(module)
        try:
            token = lib.get_token(token_label=token_label)
        except p11.PKCS11Error:  # NoSuchToken, or GeneralError after the token went away
            if not idle:
                raise
            lib.reinitialize()  # tokens created or restored since initialisation become visible
            token = lib.get_token(token_label=token_label)
        try:
            session = token.open(rw=True, user_pin=user_pin)
        except _PIN_REFUSED as e:
            _refused_pins.add((module, token_label, pin_hash))
            log.critical(
                "token %r refused the PIN (%r); it will not be tried again", token_label, e
            )
            raise HsmPinError(f"token {token_label!r} refused the PIN: {e!r}") from e
        shared = _Shared(session=session, lock=threading.Lock(), pin_hash=pin_hash, users=1)
        _shared[key] = shared
        return shared


def _release(module: str, token_label: str) -> None:
    """Drop one user of the shared session; the last one logs out and closes it."""
    with _LIB_LOCK:
        key = (module, token_label)
        shared = _shared.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _shared[key]
        try:
            with shared.lock:
                shared.session.close()
        except p11.PKCS11Error as e:
            log.debug("closing HSM session failed: %r", e)


class Hsm:
    """A logged-in session on one PKCS#11 token holding the cloud's three keypairs."""

    def __init__(self, module: str, token_label: str, user_pin: str) -> None:
        self._module = module
        self._label = token_label
        self._pairs: dict[str, _KeyPair] = {}
        try:
            shared = _acquire(module, token_label, user_pin)
        except HsmError:
            raise
        except (p11.PKCS11Error, OSError) as e:
            raise HsmUnavailableError(
                f"cannot open token {token_label!r} via {module}: {e!r}"
            ) from e
        self._session: pkcs11.Session | None = shared.session
        self._lock = shared.lock  # one PKCS#11 operation at a time on the shared session
        log.debug("HSM session open on token %r (%s)", token_label, module)

    # -- keys ------------------------------------------------------------------------

    def ensure_keys(self) -> None:
        """Generate the unwrap, signing and CA keypairs in the token if missing. Idempotent."""
        with self._lock:
            self._call("ensure keys", self._ensure_keys)

    def unwrap_public_key_pem(self) -> bytes:  # SubjectPublicKeyInfo PEM, RSA-3072
        return self._pair(UNWRAP_LABEL).public_pem

    def unwrap_key_id(self) -> str:
        """First 16 hex chars of SHA-256 over the unwrap key's SPKI DER."""
        return self._pair(UNWRAP_LABEL).key_id

    def unwrap_key_ids(self) -> tuple[str, ...]:
        """Ids of every unwrap key in the token: the current one first, then rotated ones.

        Read from the token on every call, so a rotation by another process (the CLI) is
        seen at once: a cached current key that now carries a rotated label is dropped.
        """
        with self._lock:
            labels = self._call("list unwrap keys", self._unwrap_labels)
            older = sorted(label.split(".", 1)[1] for label in labels if label != UNWRAP_LABEL)
            cached = self._pairs.get(UNWRAP_LABEL)
            if cached is not None and cached.key_id in older:
                del self._pairs[UNWRAP_LABEL]
        current = self.unwrap_key_id()
        return (current, *(k for k in older if k != current))

    def rotate_unwrap_key(self) -> str:
        return self.rotate_key(UNWRAP_LABEL)

    def rotate_key(self, label: str) -> str:
        """Retire key ``label`` as ``<label>.<id>``, generate a new one; the new id."""
        old = self._pair(label)

        def run() -> None:
            session = self._require_session()
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}):
                    obj[Attribute.LABEL] = f"{label}.{old.key_id}"
            self._pairs.pop(label, None)
            self._ensure_keys()

        with self._lock:
            self._call(f"rotate {label}", run)
        log.info("key %s rotated, %s retired", label, old.key_id)
        return self._pair(label).key_id

    def public_key_pem(self, label: str, *, fresh: bool = False) -> bytes:
        """``fresh``: find the key in the token again (another process may have rotated it)."""
        if fresh:
            with self._lock:
                self._pairs.pop(label, None)
        return self._pair(label).public_pem

    def ack_public_key_pem(self) -> bytes:  # pinned on devices
        return self._pair(ACK_LABEL).public_pem

    def ack_key_id(self) -> str:
        return self._pair(ACK_LABEL).key_id

    def signing_public_key_pem(self) -> bytes:
        return self._pair(SIGNING_LABEL).public_pem

    def signing_key_id(self) -> str:  # first 16 hex chars of SHA-256 over its SPKI DER
        return self._pair(SIGNING_LABEL).key_id

    def ca_public_key_pem(self) -> bytes:
        return self._pair(CA_LABEL).public_pem

    # -- private-key operations -------------------------------------------------------

    def decrypt_oaep(self, wrapped: bytes, key_id: str | None = None) -> bytes:
        """RSA-OAEP (SHA-1, MGF1-SHA-1) ``C_Decrypt`` with the unwrap key ``key_id``
        (default: the current one; a rotated one by its id, ``unwrap_key_ids``)."""
        label = UNWRAP_LABEL
        if key_id is not None and key_id != self.unwrap_key_id():
            label = f"{UNWRAP_LABEL}.{key_id}"
        pair = self._pair(label)
        if len(wrapped) != pair.size_bytes:
            raise HsmDecryptError(f"wrapped key is {len(wrapped)} bytes, not {pair.size_bytes}")
        private = cast(DecryptMixin, pair.private)  # DECRYPT checked in _load_pair

        def run() -> bytes:
            out = private.decrypt(
                wrapped, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1
            )
            if not isinstance(out, bytes):  # pragma: no cover - bytes in, bytes out
                raise HsmError("token returned no plaintext")
            return out

        with self._lock:
            return self._call("decrypt", run, decrypting=True)

    def sign_digest(self, digest: bytes) -> bytes:
        """``CKM_ECDSA`` with the signing key over a 32-byte SHA-256 digest; DER signature."""
        return self.sign_digest_with(SIGNING_LABEL, digest)

    def sign_digest_with(self, label: str, digest: bytes) -> bytes:
        """``CKM_ECDSA`` with the EC key ``label`` (``EC_SIGN_LABELS``); DER signature."""
        if label not in EC_SIGN_LABELS:
            raise HsmError(f"{label!r} is not a signing key")
        if len(digest) != DIGEST_BYTES:
            raise HsmError(f"digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
        private = cast(SignMixin, self._pair(label).private)  # SIGN checked

        def run() -> bytes:
            return bytes(encode_ecdsa_signature(private.sign(digest, mechanism=Mechanism.ECDSA)))

        with self._lock:
            return self._call("sign", run)

    def claim_mac(self, data: bytes) -> bytes:
        """``CKM_SHA256_HMAC`` with the token's ``claim-mac`` secret (generated inside the
        token on first use: 256 bits, sensitive, non-extractable, sign/verify only)."""

        def run() -> bytes:
            key = self._secret(CLAIM_MAC_LABEL)
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))

        with self._lock:
            return self._call("claim mac", run)

    def seal_data_key(self, dek: bytes, aad: bytes) -> bytes:
        """``CKM_AES_GCM`` encryption of a store data key under the token's ``store-kek``
        (AES-256, generated inside the token on first use, encrypt/decrypt only):
        ``nonce(12) || ciphertext || tag(16)`` (docs/adr/0022)."""
        nonce = os.urandom(12)

        def run() -> bytes:
            key = self._secret(STORE_KEK_LABEL)
            params = GCMParams(nonce, aad, 128)
            return nonce + bytes(
                key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )

        with self._lock:
            return self._call("data key seal", run)

    def open_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        """The data key ``seal_data_key`` returned as ``wrapped``; ``HsmDecryptError`` when
        it was not sealed by this token's ``store-kek`` with this ``aad``."""
        if len(wrapped) < 12 + 16:
            raise HsmDecryptError("wrapped data key is too short")

        def run() -> bytes:
            key = self._secret(STORE_KEK_LABEL)
            params = GCMParams(wrapped[:12], aad, 128)
            return bytes(
                key.decrypt(wrapped[12:], mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )

        with self._lock:
            return self._call("data key open", run, decrypting=True)

    def _secret(self, label: str) -> Any:
        return secret_key(self._require_session(), label)

    def close(self) -> None:
        """Release the session; the last ``Hsm`` on the token logs out. Idempotent."""
        with self._lock:
            session, self._session = self._session, None
            self._pairs = {}
        if session is None:
            return
        _release(self._module, self._label)
        log.debug("HSM session released on token %r", self._label)

    def __enter__(self) -> Hsm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _require_session(self) -> pkcs11.Session:
        if self._session is None:
            raise HsmUnavailableError("HSM session is closed")
        return self._session

    def _call(self, what: str, fn: Callable[[], _T], decrypting: bool = False) -> _T:
        """Run ``fn`` (lock held) and translate pkcs11 failures into HsmError classes."""
        self._require_session()
        try:
            return fn()
        except HsmError:
            raise
        except _UNAVAILABLE as e:
            raise HsmUnavailableError(f"HSM {what} failed: {e!r}") from e
        except _BAD_CIPHERTEXT as e:
            raise HsmDecryptError(f"HSM {what} refused the data: {e!r}") from e
        except _HANDLE_GONE as e:
            self._pairs = {}  # forget every cached handle: the next call looks them up again
            _stale.add(self._module)
            if decrypting and self._token_answers():
                raise HsmDecryptError(
                    f"HSM {what}: the key is not in the token now: {e!r}", transient=True
                ) from e
            raise HsmError(f"HSM {what} failed: {e!r}") from e
        except p11.GeneralError as e:
            # SoftHSM 2.6 reports an OAEP decoding failure as CKR_GENERAL_ERROR. Tell
            # that apart from a failing token by asking the token something cheap.
            if decrypting and self._token_answers():
                raise HsmDecryptError(f"HSM {what} refused the data: {e!r}", transient=True) from e
            raise HsmUnavailableError(f"HSM {what} failed: {e!r}") from e
        except (p11.PKCS11Error, ValueError, TypeError) as e:
            raise HsmError(f"HSM {what} failed: {e!r}") from e

    def _token_answers(self) -> bool:
        """The token answers and holds the ack key (so a ``retry`` ack can be signed)."""
        try:
            self._require_session().get_key(ObjectClass.PRIVATE_KEY, label=ACK_LABEL)
        except (p11.PKCS11Error, HsmError):
            return False
        return True

    def _pair(self, label: str) -> _KeyPair:
        with self._lock:
            cached = self._pairs.get(label)
            if cached is not None:
                return cached
            try:
                pair = self._call("find keys", lambda: self._load_pair(label))
            except HsmError:
                _stale.add(self._module)  # a reopen re-reads the token: the key may be back
                raise
            if pair is None:
                raise HsmError(f"key {label!r} is not in the token; run ensure_keys()")
            return pair

    def _ensure_keys(self) -> None:
        session = self._require_session()
        if self._load_pair(UNWRAP_LABEL) is None:
            log.info("generating RSA-%s key %r in the token", UNWRAP_RSA_BITS, UNWRAP_LABEL)
            session.generate_keypair(
                KeyType.RSA,
                UNWRAP_RSA_BITS,
                id=UNWRAP_LABEL.encode(),
                label=UNWRAP_LABEL,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                public_template={Attribute.VERIFY: False, Attribute.WRAP: False},
                private_template={
                    **_PRIVATE_COMMON,
                    Attribute.DECRYPT: True,
                    Attribute.SIGN: False,
                },
            )
        for ec_label in EC_SIGN_LABELS:
            if self._load_pair(ec_label) is not None:
                continue
            log.info("generating EC P-256 key %r in the token", ec_label)
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            params.generate_keypair(
                id=ec_label.encode(),
                label=ec_label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.ENCRYPT: False, Attribute.WRAP: False},
                private_template={
                    **_PRIVATE_COMMON,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                },
            )
        for label in (UNWRAP_LABEL, *EC_SIGN_LABELS):
            if self._load_pair(label) is None:
                raise HsmError(f"key {label!r} missing right after generation")
        for secret in SECRETS:  # at provisioning, not raced by two first users
            self._secret(secret)

    def _unwrap_labels(self) -> list[str]:
        session = self._require_session()
        out = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            label = str(obj[Attribute.LABEL])
            if label == UNWRAP_LABEL or label.startswith(UNWRAP_LABEL + "."):
                out.append(label)
        return out

    def _load_pair(self, label: str) -> _KeyPair | None:
        """Find a keypair by label, check its private attributes, cache it. None if absent."""
        session = self._require_session()
        privs = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
        )
        pubs = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})
        )
        if not privs and not pubs:
            return None
        if len(privs) != 1 or len(pubs) != 1:
            raise HsmError(f"token holds {len(privs)} private / {len(pubs)} public keys {label!r}")
        private, public = privs[0], pubs[0]
        if not isinstance(private, pkcs11.PrivateKey) or not isinstance(public, pkcs11.PublicKey):
            raise HsmError(f"objects labelled {label!r} are not a keypair")
        unwrap = _is_unwrap(label)
        use = Attribute.DECRYPT if unwrap else Attribute.SIGN
        other = Attribute.SIGN if unwrap else Attribute.DECRYPT
        attrs = private.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, use, other])
        if (
            not attrs[Attribute.SENSITIVE]
            or attrs[Attribute.EXTRACTABLE]
            or not attrs[use]
            or attrs[other]
        ):
            raise HsmError(f"private key {label!r} is extractable or not single-use; refusing it")
        pair = self._export(label, private, public)
        self._pairs[label] = pair
        return pair

    @staticmethod
    def _export(label: str, private: pkcs11.PrivateKey, public: pkcs11.PublicKey) -> _KeyPair:
        key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        if _is_unwrap(label):
            if public.key_type != KeyType.RSA:
                raise HsmError(f"key {label!r} is not RSA")
            key = rsa.RSAPublicNumbers(
                int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(public[Attribute.MODULUS], "big"),
            ).public_key()
            size = (key.key_size + 7) // 8
        else:
            if public.key_type != KeyType.EC:
                raise HsmError(f"key {label!r} is not EC")
            loaded = serialization.load_der_public_key(encode_ec_public_key(public))
            if (
                not isinstance(loaded, ec.EllipticCurvePublicKey)
                or loaded.curve.name != "secp256r1"
            ):
                raise HsmError(f"key {label!r} is not on P-256")
            key = loaded
            size = 32
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _KeyPair(
            private=private, public_pem=pem, key_id=key_id_from_pem(pem), size_bytes=size
        )


def _is_unwrap(label: str) -> bool:
    return label == UNWRAP_LABEL or label.startswith(UNWRAP_LABEL + ".")
