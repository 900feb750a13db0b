"""The fleet CA as the enrollment service uses it: issuing leaves, the CRL, its reload hook.

Owns: ``FleetCA`` (issues short-lived ``clientAuth`` device certificates through a
``CaSigner`` and keeps the CRL in DevCA's layout, ``<ca_dir>/crl.pem``),
``file_ca_signer`` (the CA key file kept for tests, never production) and
``run_crl_hook`` (tells the broker(s) to reload the CRL). The HSM-backed signer is in
cloud_sidecar/ca.py; who may get a certificate is decided in cloud_sidecar/fleet.py.

Invariants:
- every certificate is ``clientAuth`` only, for the CSR's (already checked) subject and
  EC key, valid from ``now - CLOCK_SKEW`` for ``cert_valid``;
- the CRL number strictly increases and each CRL's ``last_update`` is strictly later
  than the one it replaces; a CRL not signed by the fleet CA is never extended;
- CA files are read with a byte cap (``MAX_CA_FILE_BYTES``).
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cloud_sidecar.errors import CloudError, ConfigError
from fleet_protocol.certs import CaSigner, KeySigner, authority_key_id, leaf_builder
from fleet_protocol.errors import MalformedError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

MAX_CA_FILE_BYTES = 256 * 1024
CLOCK_SKEW = dt.timedelta(minutes=5)
CRL_VALID = dt.timedelta(days=365)


def read_capped(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CA_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > MAX_CA_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CA_FILE_BYTES} bytes")
    return data


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# -- the CA ----------------------------------------------------------------------------


def file_ca_signer(ca_dir: Path) -> KeySigner:
    """The CA key file ``<ca_dir>/ca.key`` (DevCA's layout); for tests, never production."""
    certificate = x509.load_pem_x509_certificate(read_capped(ca_dir / "ca.pem"))
    key = serialization.load_pem_private_key(read_capped(ca_dir / "ca.key"), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / 'ca.key'} is not an EC private key")
    if key.public_key() != certificate.public_key():
        raise ConfigError(f"{ca_dir}: ca.key does not match ca.pem")
    return KeySigner(certificate, key)


class FleetCA:
    """Issues device client certificates and maintains the CRL in ``crl_path``."""

    def __init__(self, signer: CaSigner, crl_path: Path, cert_valid: dt.timedelta) -> None:
        self.signer = signer
        self.crl_path = crl_path
        self.cert_valid = cert_valid
        self._aki = authority_key_id(signer.certificate)

    def issue(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """A clientAuth certificate for the CSR's (already checked) subject and key."""
        now = _now()
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise MalformedError("CSR key is not EC", "bad_csr")
        builder = leaf_builder(
            subject=csr.subject,
            issuer=self.signer.certificate,
            public_key=key,
            not_before=now - CLOCK_SKEW,
            not_after=now + self.cert_valid,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return self.signer.sign_certificate(builder)

    def revoke(self, serials: Sequence[int]) -> bool:
        """Add ``serials`` to the CRL; False (nothing written) when all are listed already."""
        old = x509.load_pem_x509_crl(read_capped(self.crl_path))
        if not old.is_signature_valid(self.signer.certificate.public_key()):  # type: ignore[arg-type]
            raise CloudError(f"{self.crl_path} is not signed by the fleet CA")
        entries = list(old)
        listed = {e.serial_number for e in entries}
        now = _now()
        new = [s for s in dict.fromkeys(serials) if s not in listed]
        if not new:
            return False
        entries += [
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
            for s in new
        ]
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        last = now - CLOCK_SKEW
        if last <= old.last_update_utc:  # strictly later than the CRL it replaces
            last = old.last_update_utc + dt.timedelta(seconds=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.signer.certificate.subject)
            .last_update(last)
            .next_update(last + CRL_VALID)
            .add_extension(x509.CRLNumber(number + 1), critical=False)
            .add_extension(self._aki, critical=False)
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = self.signer.sign_crl(builder)
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("CRL %s: number %d, %d serials", self.crl_path, number + 1, len(entries))
        return True


def run_crl_hook(argv: Sequence[str], crl_path: Path, timeout_s: float = 30.0) -> None:
    """Tell the broker(s) to reload the CRL: run ``argv + [crl_path]``; raise on failure."""
    if not argv:
        log.warning("no fleet.crl_hook configured: reload the broker's CRL (%s) yourself", crl_path)
        return
    try:
        out = subprocess.run(
            [*argv, str(crl_path)], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CloudError(f"CRL hook {argv[0]} failed: {e}") from e
    if out.returncode != 0:
        raise CloudError(f"CRL hook {argv[0]} exited {out.returncode}: {out.stderr[-500:]}")


__all__ = [
    "CLOCK_SKEW",
    "CRL_VALID",
    "MAX_CA_FILE_BYTES",
    "FleetCA",
    "file_ca_signer",
    "read_capped",
    "run_crl_hook",
]
