"""The dev fleet PKI: one CA that issues broker and device certificates and keeps a CRL.

Owns a directory laid out as::

    ca.pem  ca.key  crl.pem  issued/<name>.pem  issued/<name>.key

Invariants:
- every key is ECDSA P-256, every signature ECDSA with SHA-256;
- private keys are written with mode 0600, certificates and the CRL with 0644,
  directories with 0755; every file is written temp -> fsync -> rename, so a reader
  (the broker re-reading the CRL on SIGHUP) never sees half a file;
- a CRL signed by the CA exists from ``create()`` on (initially empty), and each
  ``revoke()`` writes a new one with a higher CRL number and a later ``lastUpdate``,
  so a verifier holding several CRLs of this CA picks the newest;
- a client certificate's CN is the identity the broker uses as MQTT username
  (``use_identity_as_username``), so it must be a valid fleet device id
  (``fleet_protocol.topics.DEVICE_ID_RE``) and not a reserved topic level
  (``fleet_protocol.topics.RESERVED_DEVICE_IDS``: ``ota``, ``enroll``, ``labels``);
- files read back (CA, CRL, certificates to revoke) are capped at ``MAX_PEM_BYTES``.

A ``DevCA`` made by ``create`` keeps its key on disk (a development CA: the claim CA
and the foreign/expired-certificate cases in tests). One made by ``create_with_signer``
has no ``ca.key``: every signature comes from the signer, e.g. the HSM-held fleet CA
(cloud_sidecar/ca.py ``HsmCaSigner``) that the dev stack's broker trusts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devstack.errors import PKIError
from fleet_protocol import topics
from fleet_protocol.certs import CaSigner, KeySigner, authority_key_id, ca_builder, leaf_builder
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 64 * 1024
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 365
CRL_VALID_DAYS = 365
CLOCK_SKEW = dt.timedelta(minutes=5)
# Same rule as fleet_protocol.topics.DEVICE_ID_RE (tests/unit/test_pki.py keeps them equal).
IDENTITY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RESERVED_IDENTITIES = topics.RESERVED_DEVICE_IDS
_ORG = "sovereign-edge dev"


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key (PKCS#8, unencrypted)."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _read_capped(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise PKIError(f"cannot read {path}: {e}") from e
    if len(data) > MAX_PEM_BYTES:
        raise PKIError(f"{path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_name(name: str, what: str) -> str:
    if not IDENTITY_RE.fullmatch(name):
        raise PKIError(f"invalid {what} {name[:70]!r}: must match {IDENTITY_RE.pattern}")
    return name


def _aware(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


class DevCA:
    """A dev fleet CA in one directory. Use ``create``, ``create_with_signer`` or ``load``."""

    def __init__(
        self,
        directory: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | None,
        signer: CaSigner | None = None,
    ):
        self.directory = directory
        self.certificate = cert
        if signer is None:
            if key is None:
                raise PKIError("a CA needs a key or a signer")
            signer = KeySigner(cert, key)
        self._signer = signer

    # -- construction -------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, name: str = "sovereign-edge dev fleet CA") -> DevCA:
        """Make a new CA (key, self-signed cert, empty CRL) in ``directory``."""
        if (directory / "ca.pem").exists():
            raise PKIError(f"{directory} already holds a CA; use DevCA.load")
        _mkdir(directory)
        _mkdir(directory / "issued")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = _now()
        cert = ca_builder(
            subject=subject,
            public_key=key.public_key(),
            not_before=now - CLOCK_SKEW,
            not_after=now + dt.timedelta(days=CA_VALID_DAYS),
        ).sign(key, hashes.SHA256())
        write_atomic(directory / "ca.key", _key_pem(key), 0o600)
        write_atomic(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        ca = cls(directory, cert, key)
        ca._write_crl([], crl_number=1)
        log.debug("created dev CA %r in %s", name, directory)
        return ca

    @classmethod
    def create_with_signer(cls, directory: Path, signer: CaSigner) -> DevCA:
        """A CA in ``directory`` (``ca.pem``, empty CRL, no key file) signing via ``signer``."""
        if (directory / "ca.pem").exists():
            raise PKIError(f"{directory} already holds a CA")
        _mkdir(directory)
        _mkdir(directory / "issued")
        pem = signer.certificate.public_bytes(serialization.Encoding.PEM)
        write_atomic(directory / "ca.pem", pem, 0o644)
        ca = cls(directory, signer.certificate, None, signer)
        ca._write_crl([], crl_number=1)
        return ca

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        """Open the CA that ``create`` made in ``directory``."""
        cert = x509.load_pem_x509_certificate(_read_capped(directory / "ca.pem"))
        key = serialization.load_pem_private_key(_read_capped(directory / "ca.key"), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{directory / 'ca.key'} is not an EC private key")
        if key.public_key() != cert.public_key():
            raise PKIError(f"{directory}: ca.key does not match ca.pem")
        return cls(directory, cert, key)

    # -- paths ----------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        """The CA certificate (PEM): the trust anchor for broker and clients."""
        return self.directory / "ca.pem"

    @property
    def crl_path(self) -> Path:
        """The current CRL (PEM), signed by the CA."""
        return self.directory / "crl.pem"

    # -- issuing ----------------------------------------------------------------

    def issue_server(
        self, name: str = "broker", hosts: Sequence[str] = ("localhost", "127.0.0.1")
    ) -> CertPair:
        """A TLS server certificate (serverAuth) with DNS/IP SANs for ``hosts``."""
        _check_name(name, "server name")
        if not hosts:
            raise PKIError("a server certificate needs at least one host")
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = _now()
        return self._issue(
            name,
            ExtendedKeyUsageOID.SERVER_AUTH,
            now - CLOCK_SKEW,
            now + dt.timedelta(days=SERVER_VALID_DAYS),
            x509.SubjectAlternativeName(sans),
        )

    def issue_client(
        self, common_name: str, valid_days: int = 30, not_before: dt.datetime | None = None
    ) -> CertPair:
        """A TLS client certificate (clientAuth) whose CN is the MQTT identity.

        ``not_before`` defaults to now minus a small clock-skew allowance; a naive
        datetime is taken as UTC. Re-issuing a name replaces its files.
        """
        _check_name(common_name, "client identity")
        if common_name in RESERVED_IDENTITIES:
            raise PKIError(f"client identity {common_name!r} is a reserved topic level")
        if valid_days < 1:
            raise PKIError(f"valid_days must be >= 1, got {valid_days}")
        start = _now() - CLOCK_SKEW if not_before is None else _aware(not_before)
        return self._issue(
            common_name,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            start,
            start + dt.timedelta(days=valid_days),
            None,
        )

    def _issue(
        self,
        name: str,
        eku: x509.ObjectIdentifier,
        not_before: dt.datetime,
        not_after: dt.datetime,
        san: x509.SubjectAlternativeName | None,
    ) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        builder = leaf_builder(
            subject=subject,
            issuer=self.certificate,
            public_key=key.public_key(),
            not_before=not_before,
            not_after=not_after,
            eku=eku,
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = self._signer.sign_certificate(builder)
        issued = self.directory / "issued"
        _mkdir(issued)
        pair = CertPair(issued / f"{name}.pem", issued / f"{name}.key")
        write_atomic(pair.key, _key_pem(key), 0o600)
        write_atomic(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.debug("issued %s cert CN=%s serial=%x", eku._name, name, cert.serial_number)
        return pair

    # -- revocation -------------------------------------------------------------

    def load_crl(self) -> x509.CertificateRevocationList:
        """The current CRL, after checking it is signed by this CA."""
        crl = x509.load_pem_x509_crl(_read_capped(self.crl_path))
        if not crl.is_signature_valid(self.certificate.public_key()):  # type: ignore[arg-type]
            raise PKIError(f"{self.crl_path} is not signed by this CA")
        return crl

    def revoke(self, cert: Path) -> Path:
        """Add ``cert`` (issued by this CA) to the CRL; returns the CRL path.

        Revoking a certificate that is already listed rewrites nothing.
        """
        target = x509.load_pem_x509_certificate(_read_capped(cert))
        if target.issuer != self.certificate.subject:
            raise PKIError(f"{cert} was not issued by this CA")
        try:
            target.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise PKIError(f"{cert} was not issued by this CA: {e}") from e
        old = self.load_crl()
        entries = list(old)
        if any(e.serial_number == target.serial_number for e in entries):
            log.debug("serial %x already revoked", target.serial_number)
            return self.crl_path
        entries.append(
            x509.RevokedCertificateBuilder()
            .serial_number(target.serial_number)
            .revocation_date(_now())
            .build()
        )
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self._write_crl(entries, number + 1, previous=old.last_update_utc)
        log.debug("revoked serial %x (%s)", target.serial_number, cert)
        return self.crl_path

    def _write_crl(
        self,
        entries: Sequence[x509.RevokedCertificate],
        crl_number: int,
        previous: dt.datetime | None = None,
    ) -> None:
        # lastUpdate sits a little in the past (clock skew) and strictly increases
        # from one CRL to the next, so verifiers that keep old CRLs prefer this one.
        last = _now() - CLOCK_SKEW
        if previous is not None and last <= previous:
            last = previous + dt.timedelta(seconds=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(last)
            .next_update(last + dt.timedelta(days=CRL_VALID_DAYS))
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(authority_key_id(self.certificate), critical=False)
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = self._signer.sign_crl(builder)
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
