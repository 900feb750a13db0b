"""The device's key custody: a TPM 2.0 signing key and a TPM-sealed storage key.

Owns: the ESAPI connection to the TPM (``/dev/tpmrm0`` on a Pi, ``swtpm`` in the
devstack), a primary storage key in the owner hierarchy, an ECC P-256 signing key
created inside the TPM under it, and a 32-byte storage key sealed by the TPM.

Invariants:
- no private key and no storage key is ever written to disk in clear: ``state_dir``
  holds only TPM-wrapped blobs (TPM2B_PUBLIC + TPM2B_PRIVATE, encrypted and
  integrity-protected under the primary key), written temp -> fsync -> rename;
- the primary key is re-derived from the owner seed on every open (same template,
  same key), so the blobs stay loadable after a TPM restart with the same state;
- the identity (signing) key is created once, made persistent at
  ``SIGNING_PERSISTENT_HANDLE`` (EvictControl) and opened from there afterwards, so it
  survives a wiped or replaced SD card; its blob is kept as the record of its public
  area (and migrates older devices); the sealed storage key stays a blob, bound to this
  TPM; a blob on disk is read with a byte cap and any public area is checked before use;
- the storage key's random bytes and its unsealed value cross the TPM bus only
  inside a salted, AES-CFB parameter-encrypted session;
- every TPM or blob failure surfaces as ``edge_daemon.errors.KeyStoreError``;
  calls are serialised by a lock; this module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HT,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NONCE,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from edge_daemon.errors import KeyStoreError
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

# Owner range (TPM 2.0 Part 2, 0x81000000-0x8100FFFF). The TCG reserves 0x8101xxxx for
# endorsement keys: swtpm_setup and many factory TPMs keep the EK at 0x81010001, where
# earlier versions put the identity key (still used when it holds one: LEGACY_...).
SIGNING_PERSISTENT_HANDLE = 0x81000101
LEGACY_SIGNING_HANDLE = 0x81010001
"""Owner-hierarchy persistent handle of the device identity (signing) key."""

MAX_BLOB_BYTES = 4096
"""Byte cap on a key blob read from ``state_dir``."""

STORAGE_KEY_BYTES = 32
SIGNING_BLOB = "signing.tpmkey"
STORAGE_BLOB = "storage.sealed"

_BLOB_MAGIC = b"SEVTPM1\n"
_PRIMARY_TEMPLATE = "ecc256:aes128cfb"
_SIGNING_TEMPLATE = "ecc256:ecdsa-sha256"
_SIGNING_ATTRS = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
# A sealed data object: keyedhash with neither sign nor decrypt; data supplied by us.
_SEALED_ATTRS = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.USERWITHAUTH
_MAX_STALE_HANDLES = 64


@contextlib.contextmanager
def _tpm_errors(what: str) -> Iterator[None]:
    """Turn any tpm2-pytss / OS failure inside the block into ``KeyStoreError``."""
    try:
        yield
    except KeyStoreError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        # TSS2_Exception is a RuntimeError; marshalling raises ValueError/TypeError.
        raise KeyStoreError(f"TPM {what} failed: {e}") from e


def _encode_blob(public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> bytes:
    return _BLOB_MAGIC + bytes(public.marshal()) + bytes(private.marshal())


def _decode_blob(path: Path) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    with open(path, "rb") as f:
        data = f.read(MAX_BLOB_BYTES + 1)
    if len(data) > MAX_BLOB_BYTES:
        raise KeyStoreError(f"key blob {path} exceeds {MAX_BLOB_BYTES} bytes")
    if not data.startswith(_BLOB_MAGIC):
        raise KeyStoreError(f"key blob {path} has an unknown format")
    body = data[len(_BLOB_MAGIC) :]
    with _tpm_errors(f"decoding {path.name}"):
        public, used = TPM2B_PUBLIC.unmarshal(body)
        private, used2 = TPM2B_PRIVATE.unmarshal(body[used:])
    if used + used2 != len(body):
        raise KeyStoreError(f"key blob {path} has trailing bytes")
    return public, private


class TpmKeyStore:
    """Signing key and sealed storage key of one device, kept by its TPM.

    A swtpm serves one connection at a time, and without a resource manager the
    TPM's transient object slots are shared: keep one open store per TPM.
    """

    def __init__(self, tcti: str, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._lock = threading.Lock()
        self._signing: ESYS_TR | None = None
        self._signing_public: TPM2B_PUBLIC | None = None
        self._closed = False
        with _tpm_errors("state directory"):
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _tpm_errors(f"connect ({tcti})"):
            self._esapi = ESAPI(tcti)
        try:
            with _tpm_errors("create primary"):
                self._flush_stale_transients()
                template = TPM2B_PUBLIC.parse(
                    _PRIMARY_TEMPLATE,
                    objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS,
                )
                self._primary, _, _, _, _ = self._esapi.create_primary(
                    None, template, ESYS_TR.OWNER
                )
        except BaseException:
            with contextlib.suppress(RuntimeError):
                self._esapi.close()
            raise
        log.debug("TPM key store open (tcti %s, state %s)", tcti, state_dir)

    # -- public API -------------------------------------------------------------------

    def signing_public_key_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the device's ECC P-256 signing key."""
        with self._lock:
            _, public = self._signing_key()
            with _tpm_errors("export public key"):
                return bytes(public.to_pem())

    def signing_key_id(self) -> str:
        """First 16 hex chars of SHA-256 over the signing key's SPKI DER."""
        return key_id_from_pem(self.signing_public_key_pem())

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 signature (DER) over a 32-byte SHA-256 digest, made by the TPM."""
        if len(digest) != hashlib.sha256().digest_size:
            raise KeyStoreError(f"digest must be 32 bytes, got {len(digest)}")
        with self._lock:
            handle, _ = self._signing_key()
            with _tpm_errors("sign"):
                scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own ECDSA-SHA256
                signature = self._esapi.sign(handle, digest, scheme)
                return bytes(signature)

    # -- proof of residence: credential activation against the EK (issue 9) ----------

    def ek_certificate_pem(self) -> str:
        """The RSA-2048 EK certificate the manufacturer (swtpm_localca) wrote to NV, or ""."""
        with self._lock:
            self._check_open()
            try:
                with _tpm_errors("read EK certificate"):
                    cert, _ = create_ek_template("EK-RSA2048", NVReadEK(self._esapi))
            except KeyStoreError:
                return ""
            if not cert:
                return ""
            return x509.load_der_x509_certificate(cert).public_bytes(Encoding.PEM).decode()

    def identity_public_area(self) -> bytes:
        """The identity key's TPM2B_PUBLIC, marshalled: the cloud derives its TPM Name."""
        with self._lock:
            _, public = self._signing_key()
            return bytes(public.marshal())

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """``TPM2_ActivateCredential`` with the identity key and the EK: the secret the
        cloud sealed to both, recoverable only inside this TPM."""
        with self._lock:
            signing, _ = self._signing_key()
            with _tpm_errors("activate credential"):
                _, template = create_ek_template("EK-RSA2048", NVReadEK(self._esapi))
                ek, _, _, _, _ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
                try:
                    session = self._esapi.start_auth_session(
                        ESYS_TR.NONE,
                        ESYS_TR.NONE,
                        TPM2_SE.POLICY,
                        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                        TPM2_ALG.SHA256,
                    )
                    try:
                        self._esapi.policy_secret(
                            ESYS_TR.ENDORSEMENT, session, TPM2B_NONCE(), TPM2B_DIGEST(), b"", 0
                        )
                        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
                        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
                        out = self._esapi.activate_credential(
                            signing, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                        )
                    finally:
                        with contextlib.suppress(Exception):
                            self._esapi.flush_context(session)
                finally:
                    self._esapi.flush_context(ek)
            return bytes(out)

    def storage_key(self) -> bytes:
        """The device's 32-byte storage key: sealed by the TPM on first use, unsealed after."""
        with self._lock:
            self._check_open()
            path = self._state_dir / STORAGE_BLOB
            if path.exists():
                return self._unseal(path)
            return self._create_sealed(path)

    def close(self) -> None:
        """Flush the loaded keys and close the TPM connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._signing is not None:  # persistent: drop our reference, keep the key
                with contextlib.suppress(RuntimeError):
                    self._esapi.tr_close(self._signing)
            if self._primary is not None:
                with contextlib.suppress(RuntimeError):
                    self._esapi.flush_context(self._primary)
            self._signing = None
            with contextlib.suppress(RuntimeError):
                self._esapi.close()
            log.debug("TPM key store closed (state %s)", self._state_dir)

    def __enter__(self) -> TpmKeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals (lock held) --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KeyStoreError("TPM key store is closed")

    def _flush_stale_transients(self) -> None:
        """Flush transient objects a crashed earlier user left in the TPM (swtpm, no RM)."""
        _, data = self._esapi.get_capability(
            TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, _MAX_STALE_HANDLES
        )
        for raw in data.data.handles:
            with contextlib.suppress(RuntimeError):
                self._esapi.flush_context(self._esapi.tr_from_tpmpublic(raw))
                log.debug("flushed stale transient TPM handle %#x", int(raw))

    def _param_session(self, attrs: TPMA_SESSION) -> ESYS_TR:
        """A one-shot HMAC session salted by the primary key, encrypting parameters."""
        session = self._esapi.start_auth_session(
            tpm_key=self._primary,
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF.parse("aes128cfb"),
            auth_hash=TPM2_ALG.SHA256,
        )
        # No CONTINUESESSION: the TPM flushes the session after one command.
        self._esapi.trsess_set_attributes(session, attrs)
        return session

    def _signing_key(self) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        """The identity key at its persistent handle; created (or migrated from a blob) once."""
        self._check_open()
        if self._signing is not None and self._signing_public is not None:
            return self._signing, self._signing_public
        path = self._state_dir / SIGNING_BLOB
        persisted = self._persistent_signing_key()
        if persisted is not None:
            self._signing, self._signing_public = persisted
            return persisted
        if path.exists():
            public, private = _decode_blob(path)
            self._check_signing_public(public, path)
            log.debug("migrating TPM signing key from %s to a persistent handle", path)
        else:
            with _tpm_errors("create signing key"):
                template = TPM2B_PUBLIC.parse(_SIGNING_TEMPLATE, objectAttributes=_SIGNING_ATTRS)
                private, public, _, _, _ = self._esapi.create(self._primary, None, template)
                write_atomic(path, _encode_blob(public, private))
            log.debug("created TPM signing key, blob %s", path)
        with _tpm_errors("persist signing key"):
            loaded = self._esapi.load(self._primary, private, public)
            self._signing = self._esapi.evict_control(
                ESYS_TR.RH_OWNER, loaded, SIGNING_PERSISTENT_HANDLE
            )
            self._esapi.flush_context(loaded)
        self._signing_public = public
        return self._signing, public

    def _persistent_signing_key(self) -> tuple[ESYS_TR, TPM2B_PUBLIC] | None:
        """The key at ``SIGNING_PERSISTENT_HANDLE`` if the TPM holds one (checked like a blob),
        else an identity key an earlier version left at ``LEGACY_SIGNING_HANDLE`` (never an
        EK that lives there)."""
        for handle_id in (SIGNING_PERSISTENT_HANDLE, LEGACY_SIGNING_HANDLE):
            with _tpm_errors("list persistent handles"):
                _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, handle_id, 1)
            if handle_id not in [int(h) for h in data.data.handles]:
                continue
            with _tpm_errors("open persistent signing key"):
                handle = self._esapi.tr_from_tpmpublic(handle_id)
                public, _, _ = self._esapi.read_public(handle)
            try:
                self._check_signing_public(public, Path(f"persistent handle {handle_id:#x}"))
            except KeyStoreError:
                if handle_id == LEGACY_SIGNING_HANDLE:
                    continue  # the EK (TCG's handle), not ours
                raise
            return handle, public
        return None

    @staticmethod
    def _check_signing_public(public: TPM2B_PUBLIC, path: Path) -> None:
        area = public.publicArea
        attrs = int(area.objectAttributes)
        if (
            area.type != TPM2_ALG.ECC
            or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256
            or attrs & _SIGNING_ATTRS != _SIGNING_ATTRS
            or attrs & TPMA_OBJECT.DECRYPT
        ):
            raise KeyStoreError(f"key blob {path} is not an ECC P-256 signing key")

    def _create_sealed(self, path: Path) -> bytes:
        with _tpm_errors("seal storage key"):
            rng_session = self._param_session(TPMA_SESSION.ENCRYPT)
            key = bytes(self._esapi.get_random(STORAGE_KEY_BYTES, session1=rng_session))
            if len(key) != STORAGE_KEY_BYTES:
                raise KeyStoreError(f"TPM returned {len(key)} random bytes")
            sensitive = TPM2B_SENSITIVE_CREATE(
                TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(key))
            )
            template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=_SEALED_ATTRS)
            create_session = self._param_session(TPMA_SESSION.DECRYPT)
            private, public, _, _, _ = self._esapi.create(
                self._primary, sensitive, template, session2=create_session
            )
            write_atomic(path, _encode_blob(public, private))
        log.debug("sealed a new storage key, blob %s", path)
        return key

    def _unseal(self, path: Path) -> bytes:
        public, private = _decode_blob(path)
        area = public.publicArea
        if area.type != TPM2_ALG.KEYEDHASH or int(area.objectAttributes) & (
            TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.DECRYPT
        ):
            raise KeyStoreError(f"sealed blob {path} is not a sealed data object")
        with _tpm_errors("unseal storage key"):
            handle = self._esapi.load(self._primary, private, public)
            try:
                session = self._param_session(TPMA_SESSION.ENCRYPT)
                key = bytes(self._esapi.unseal(handle, session1=ESYS_TR.PASSWORD, session2=session))
            finally:
                self._esapi.flush_context(handle)
        if len(key) != STORAGE_KEY_BYTES:
            raise KeyStoreError(f"sealed blob {path} holds {len(key)} bytes, expected 32")
        return key
