"""The dev CA issues certificates with the right names and usages and keeps a signed CRL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from devstack.errors import PKIError
from devstack.pki import IDENTITY_RE, DevCA
from fleet_protocol.topics import DEVICE_ID_RE


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.create(tmp_path_factory.mktemp("pki") / "ca")


def test_client_cert_has_identity_as_cn_and_only_client_auth(ca: DevCA) -> None:
    cert = _cert(ca.issue_client("dev-0001").cert)
    assert _cn(cert) == "dev-0001"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"


def test_client_cert_validity_follows_not_before_and_valid_days(ca: DevCA) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert = _cert(ca.issue_client("dev-old", valid_days=2, not_before=start).cert)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + dt.timedelta(days=2)


def test_server_cert_has_server_auth_and_dns_and_ip_sans(ca: DevCA) -> None:
    cert = _cert(ca.issue_server("broker", hosts=("localhost", "127.0.0.1")).cert)
    assert _cn(cert) == "broker"
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    chain = verifier.verify(cert, [])
    assert chain[-1] == ca.certificate


def test_ca_cert_is_a_ca_limited_to_signing_certs_and_crls(ca: DevCA) -> None:
    basic = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert basic.ca is True
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature


def test_key_files_are_0600_and_cert_files_0644(ca: DevCA) -> None:
    pair = ca.issue_client("dev-perm")
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca.directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(ca.crl_path.stat().st_mode) == 0o644


def test_new_ca_has_an_empty_crl_signed_by_it(tmp_path: Path) -> None:
    fresh = DevCA.create(tmp_path / "ca")
    crl = fresh.load_crl()
    assert len(crl) == 0
    assert crl.issuer == fresh.certificate.subject
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > dt.datetime.now(dt.UTC)


def test_revoke_lists_serial_in_a_newer_signed_crl(tmp_path: Path) -> None:
    fresh = DevCA.create(tmp_path / "ca")
    before = fresh.load_crl()
    a, b = fresh.issue_client("dev-a"), fresh.issue_client("dev-b")
    fresh.revoke(a.cert)
    fresh.revoke(b.cert)
    crl = fresh.load_crl()
    for pair in (a, b):
        serial = _cert(pair.cert).serial_number
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert len(crl) == 2
    assert crl.last_update_utc > before.last_update_utc

    def number(c: x509.CertificateRevocationList) -> int:
        return c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number(crl) == number(before) + 2


def test_revoking_twice_keeps_one_entry(tmp_path: Path) -> None:
    fresh = DevCA.create(tmp_path / "ca")
    pair = fresh.issue_client("dev-a")
    fresh.revoke(pair.cert)
    fresh.revoke(pair.cert)
    assert len(fresh.load_crl()) == 1


def test_revoke_refuses_a_certificate_of_another_ca(ca: DevCA, tmp_path: Path) -> None:
    other = DevCA.create(tmp_path / "other").issue_client("dev-x")
    with pytest.raises(PKIError):
        ca.revoke(other.cert)


def test_load_reopens_the_same_ca(ca: DevCA) -> None:
    again = DevCA.load(ca.directory)
    assert again.certificate == ca.certificate
    cert = _cert(again.issue_client("dev-loaded").cert)
    cert.verify_directly_issued_by(ca.certificate)


def test_create_refuses_to_overwrite_an_existing_ca(ca: DevCA) -> None:
    with pytest.raises(PKIError):
        DevCA.create(ca.directory)


@pytest.mark.parametrize("name", ["ota", "Dev-A", "dev/a", "dev+", "#", "", "-dev", "a" * 64])
def test_issue_client_refuses_names_unfit_as_topic_level(ca: DevCA, name: str) -> None:
    with pytest.raises(PKIError):
        ca.issue_client(name)


def test_identity_rule_matches_the_protocol_device_id_rule() -> None:
    assert IDENTITY_RE.pattern == DEVICE_ID_RE.pattern
