"""The fleet CA key lives in a real SoftHSM2 token; certificates and CRLs it signs verify.

Checks with cryptography and with the ``openssl`` CLI (``verify -CAfile``, ``crl
-verify``) that what ``HsmCaSigner`` assembles is a valid X.509 structure signed by
the token's non-extractable ``fleet-ca`` key, and that no CA key file exists.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, ObjectClass

from cloud_sidecar.ca import HsmCaSigner, create_ca_certificate
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.fleet_ca import FleetCA
from cloud_sidecar.keys.hsm import CA_LABEL, Hsm
from devstack.pki import DevCA
from devstack.procs import require_tool
from devstack.softhsm import HsmToken, init_token

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmToken]:
    tok = init_token(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tok.env().items():  # before the PKCS#11 library is (re)initialised
            mp.setenv(k, v)
        with Hsm(str(tok.module), tok.label, tok.user_pin) as hsm:
            hsm.ensure_keys()
        yield tok


@pytest.fixture(scope="module")
def opener(token: HsmToken) -> Callable[[], Hsm]:
    return lambda: Hsm(str(token.module), token.label, token.user_pin)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory, opener: Callable[[], Hsm]) -> DevCA:
    cert = create_ca_certificate(opener, "test fleet CA (HSM)")
    return DevCA.create_with_signer(
        tmp_path_factory.mktemp("pki") / "ca", HsmCaSigner(opener, cert)
    )


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool("openssl")
    argv = ["openssl", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _csr(cn: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _write(path: Path, obj: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path


def test_ca_key_is_sensitive_non_extractable_and_sign_only(token: HsmToken) -> None:
    lib = pkcs11.lib(str(token.module))
    with lib.get_token(token_label=token.label).open(user_pin=token.user_pin) as session:
        key = session.get_key(ObjectClass.PRIVATE_KEY, label=CA_LABEL)
        attrs = key.get_attributes(
            [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.SIGN, Attribute.DECRYPT]
        )
    assert attrs[Attribute.SENSITIVE] is True
    assert attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.SIGN] is True
    assert attrs[Attribute.DECRYPT] is False


def test_ca_certificate_is_self_signed_by_the_token_key(
    ca: DevCA, opener: Callable[[], Hsm]
) -> None:
    cert = ca.certificate
    with opener() as hsm:
        pem = hsm.ca_public_key_pem()
        assert pem != hsm.signing_public_key_pem()  # its own key, not the OTA key
    assert cert.public_key() == serialization.load_pem_public_key(pem)
    cert.verify_directly_issued_by(cert)  # raises on a bad signature
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True
    assert not (ca.directory / "ca.key").exists()
    out = _openssl("verify", "-CAfile", str(ca.cert_path), str(ca.cert_path))
    assert out.returncode == 0, out.stderr


def test_issued_client_certificate_verifies_under_the_ca_with_openssl(
    ca: DevCA, opener: Callable[[], Hsm], tmp_path: Path
) -> None:
    fleet = FleetCA(HsmCaSigner(opener, ca.certificate), ca.crl_path, dt.timedelta(days=7))
    cert = fleet.issue(_csr("hsm-dev-1"))
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hsm-dev-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    path = _write(tmp_path / "dev.pem", cert)
    out = _openssl("verify", "-purpose", "sslclient", "-CAfile", str(ca.cert_path), str(path))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_crl_signed_in_the_token_verifies_with_openssl_and_lists_the_revoked_serial(
    ca: DevCA, opener: Callable[[], Hsm], tmp_path: Path
) -> None:
    fleet = FleetCA(HsmCaSigner(opener, ca.certificate), ca.crl_path, dt.timedelta(days=7))
    cert = fleet.issue(_csr("hsm-dev-2"))
    before = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert fleet.revoke([cert.serial_number]) is True
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    old = before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == old + 1
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    out = _openssl("crl", "-in", str(ca.crl_path), "-CAfile", str(ca.cert_path), "-noout")
    assert out.returncode == 0 and "verify OK" in out.stderr, out.stderr
    path = _write(tmp_path / "revoked.pem", cert)
    out = _openssl(
        "verify",
        "-crl_check",
        "-CAfile",
        str(ca.cert_path),
        "-CRLfile",
        str(ca.crl_path),
        str(path),
    )
    assert out.returncode != 0 and "revoked" in (out.stdout + out.stderr)


def test_dev_ca_with_the_hsm_signer_issues_certificates_openssl_accepts(ca: DevCA) -> None:
    pair = ca.issue_server("broker-hsm", hosts=("localhost",))
    out = _openssl("verify", "-purpose", "sslserver", "-CAfile", str(ca.cert_path), str(pair.cert))
    assert out.returncode == 0, out.stderr


def test_signer_refuses_a_ca_certificate_that_is_not_for_the_token_key(
    opener: Callable[[], Hsm], tmp_path: Path
) -> None:
    foreign = DevCA.create(tmp_path / "foreign")
    with pytest.raises(ConfigError):
        HsmCaSigner(opener, foreign.certificate)
