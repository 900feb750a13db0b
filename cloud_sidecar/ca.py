"""The fleet CA whose private key never leaves the HSM.

Owns: ``HsmCaSigner`` (the production ``CaSigner`` of fleet_protocol/certs.py) and
``create_ca_certificate``, the one-time, self-signed CA certificate made at
provisioning. Both sign with the token's ``fleet-ca`` key (EC P-256, sensitive,
non-extractable, sign only; cloud_sidecar/keys/hsm.py) through ``CKM_ECDSA`` over
SHA-256 of the DER ``TBSCertificate`` / ``TBSCertList``.

How a structure is signed: cryptography's builders lay out the to-be-signed part (so
extensions, names and validity are encoded by the same well-tested code as every
other certificate here); they insist on signing, so they sign with a throw-away
in-memory P-256 key, and only the TBS bytes of that result are kept. The algorithm
identifier inside the TBS (``ecdsa-with-SHA256``, no parameters) is the same for any
P-256 key, so the TBS is exactly what the CA key must sign. The HSM signs
SHA-256(TBS); asn1crypto assembles ``SEQUENCE {tbs, algorithm, BIT STRING signature}``.

Invariants:
- the fleet CA key is used only through ``Hsm.sign_digest_with(CA_LABEL, ...)``;
- every certificate or CRL returned was verified under the CA certificate's public
  key after assembly (an HSM returning a bad signature raises ``HsmError``);
- ``HsmCaSigner`` refuses a CA certificate whose public key is not the token's CA key;
- the throw-away key's signatures are discarded, never written or returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_sidecar.errors import ConfigError, HsmError
from cloud_sidecar.keys.hsm import CA_LABEL, Hsm
from fleet_protocol.certs import ca_builder

log = logging.getLogger(__name__)

CA_VALID_DAYS = 3650
CLOCK_SKEW = dt.timedelta(minutes=5)
_SIG_ALG = {"algorithm": "sha256_ecdsa"}  # ecdsa-with-SHA256, no parameters (RFC 5758)

HsmOpener = Callable[[], Hsm]


def _scratch_key() -> ec.EllipticCurvePrivateKey:
    # Only to make cryptography's builders emit a TBS; its signature is thrown away.
    return ec.generate_private_key(ec.SECP256R1())


def _hsm_signature(open_hsm: HsmOpener, tbs: bytes, label: str) -> bytes:
    """DER ECDSA signature by the token key ``label`` over SHA-256(``tbs``)."""
    digest = hashlib.sha256(tbs).digest()
    with open_hsm() as hsm:
        return hsm.sign_digest_with(label, digest)


def _ca_public_key(open_hsm: HsmOpener, label: str) -> ec.EllipticCurvePublicKey:
    with open_hsm() as hsm:
        pem = hsm.ca_public_key_pem() if label == CA_LABEL else hsm.signing_public_key_pem()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - Hsm checks
        raise HsmError(f"token key {label!r} is not EC")
    return key


def _assemble_certificate(tbs: bytes, signature: bytes) -> x509.Certificate:
    der = asn1_x509.Certificate(
        {
            "tbs_certificate": asn1_x509.TbsCertificate.load(tbs),
            "signature_algorithm": _SIG_ALG,
            "signature_value": signature,
        }
    ).dump()
    return x509.load_der_x509_certificate(der)


def _verify(key: ec.EllipticCurvePublicKey, signature: bytes, tbs: bytes, what: str) -> None:
    try:
        key.verify(signature, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise HsmError(f"the HSM's signature on the {what} does not verify") from e


def create_ca_certificate(
    open_hsm: HsmOpener,
    name: str = "sovereign-edge fleet CA",
    organization: str = "sovereign-edge",
    valid_days: int = CA_VALID_DAYS,
) -> x509.Certificate:
    """The self-signed CA certificate of the token's fleet CA key (once, at provisioning)."""
    public = _ca_public_key(open_hsm, CA_LABEL)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = ca_builder(
        subject=subject,
        public_key=public,
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=valid_days),
    )
    tbs = builder.sign(_scratch_key(), hashes.SHA256()).tbs_certificate_bytes
    signature = _hsm_signature(open_hsm, tbs, CA_LABEL)
    _verify(public, signature, tbs, "CA certificate")
    cert = _assemble_certificate(tbs, signature)
    log.info("created fleet CA certificate %r (key in the HSM)", name)
    return cert


class HsmCaSigner:
    """``CaSigner`` whose signatures are made inside the HSM by the ``fleet-ca`` key.

    ``open_hsm`` returns a fresh ``Hsm`` (sessions on one token are shared in-process,
    so this is cheap where the sidecar holds one); each signature opens and closes
    one, so a token that went away and came back is picked up without a restart.
    """

    def __init__(
        self, open_hsm: HsmOpener, certificate: x509.Certificate, label: str = CA_LABEL
    ) -> None:
        self.certificate = certificate
        self._open_hsm = open_hsm
        self._label = label
        self._public = _ca_public_key(open_hsm, label)
        if self._public != certificate.public_key():
            raise ConfigError(f"the CA certificate is not for the token's {label!r} key")

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign the TBSCertificate that ``builder`` describes with the HSM key."""
        tbs = builder.sign(_scratch_key(), hashes.SHA256()).tbs_certificate_bytes
        signature = _hsm_signature(self._open_hsm, tbs, self._label)
        _verify(self._public, signature, tbs, "certificate")
        return _assemble_certificate(tbs, signature)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign the TBSCertList that ``builder`` describes with the HSM key."""
        tbs = builder.sign(_scratch_key(), hashes.SHA256()).tbs_certlist_bytes
        signature = _hsm_signature(self._open_hsm, tbs, self._label)
        _verify(self._public, signature, tbs, "CRL")
        der = asn1_crl.CertificateList(
            {
                "tbs_cert_list": asn1_crl.TbsCertList.load(tbs),
                "signature_algorithm": _SIG_ALG,
                "signature": signature,
            }
        ).dump()
        return x509.load_der_x509_crl(der)


__all__ = ["HsmCaSigner", "HsmOpener", "create_ca_certificate"]
