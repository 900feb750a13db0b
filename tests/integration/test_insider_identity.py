"""Insider paths with the real components (issue 9): SoftHSM, swtpm, Mosquitto, the store.

- a claim row written straight into the store (an insider with write access to it, but
  not to the HSM) enrolls nobody: the record must be the HSM's MAC (``claim-mac``);
- a service identity cannot be claimed;
- a wrong HSM PIN is presented to the token once: the reopen loop stops and says so;
- the CA certifies only identity keys that live in a TPM with a trusted EK: a software
  key (even dressed in a TPM public area), a TPM without an EK certificate, or an EK
  from another "manufacturer" gets no certificate (credential activation, swtpm EKs
  issued by devstack's local CA).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509.oid import NameOID
from tpm2_pytss.types import TPM2B_PUBLIC

from cloud_sidecar.errors import ConfigError
from devstack.softhsm import init_token
from edge_daemon.enroll import enroll_device
from edge_daemon.errors import EnrollmentError
from edge_daemon.keys.tpm import TpmKeyStore
from fleet_protocol import enroll

from .conftest import Cloud
from .test_enrollment import claim_endpoint, do_enroll, fleet_of, new_device

pytestmark = pytest.mark.integration


def test_a_claim_an_insider_wrote_into_the_store_enrolls_nobody(cloud: Cloud) -> None:
    forged = enroll.Claim.new()
    cloud.app.store.add_claim(
        forged.claim_id,
        "ins-forged",
        enroll.token_hash(forged.token),  # what the store held before issue 9
        int(time.time() * 1000) + 600_000,
    )
    with new_device(cloud, "ins-forged") as dev, pytest.raises(EnrollmentError) as e:
        do_enroll(cloud, dev, forged)
    assert e.value.reason == "bad_token"
    assert cloud.app.store.device("ins-forged") is None
    claim = fleet_of(cloud).create_claim("ins-real")  # the HSM-bound claim works
    with new_device(cloud, "ins-real") as dev:
        assert do_enroll(cloud, dev, claim).path.exists()


class _StandIn:
    """A device's TPM as an attacker presents it: the real EK certificate and TPM (which
    cannot activate for a key it does not hold), and whatever public area they like."""

    def __init__(self, real: TpmKeyStore, ek_pem: str | None = None, public: bytes = b""):
        self.real, self.ek_pem, self.public = real, ek_pem, public

    def ek_certificate_pem(self) -> str:
        return self.real.ek_certificate_pem() if self.ek_pem is None else self.ek_pem

    def identity_public_area(self) -> bytes:
        return self.public or self.real.identity_public_area()

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        return self.real.activate_credential(blob, secret)


def _software_key_dressed_as_tpm(real: TpmKeyStore, key: ec.EllipticCurvePrivateKey) -> bytes:
    public, _ = TPM2B_PUBLIC.unmarshal(real.identity_public_area())
    n = key.public_key().public_numbers()
    public.publicArea.unique.ecc.x = n.x.to_bytes(32, "big")
    public.publicArea.unique.ecc.y = n.y.to_bytes(32, "big")
    return bytes(public.marshal())


def _foreign_ek_cert() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another manufacturer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_a_software_identity_key_gets_no_certificate_even_with_a_valid_claim(
    cloud: Cloud,
) -> None:
    """Whoever sees a claim token first could enroll a software key before issue 9."""
    soft = ec.generate_private_key(ec.SECP256R1())
    pem = soft.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    before = cloud.app.metrics.get("fleet_challenged_total")
    claim = fleet_of(cloud).create_claim("ins-soft")
    with new_device(cloud, "ins-soft") as dev, pytest.raises(EnrollmentError) as e:
        enroll_device(
            "ins-soft",
            claim,
            lambda d: soft.sign(d, ec.ECDSA(utils.Prehashed(hashes.SHA256()))),
            pem,
            dev.store,
            claim_endpoint(cloud),
            timeout_s=8,
            tpm=_StandIn(dev.keys, public=_software_key_dressed_as_tpm(dev.keys, soft)),
        )
    assert e.value.reason == "activation_failed"  # the TPM holds no key of that Name
    assert cloud.app.metrics.get("fleet_challenged_total") == before + 1
    assert cloud.app.store.device("ins-soft") is None
    with new_device(cloud, "ins-soft-2") as dev:  # the claim was not burnt
        assert do_enroll(cloud, dev, claim_for(cloud, "ins-soft-2")).path.exists()


@pytest.mark.parametrize(
    ("ek_pem", "reason"), [("", "no_ek_certificate"), (None, "bad_ek_certificate")]
)
def test_a_tpm_without_a_trusted_ek_certificate_gets_no_certificate(
    cloud: Cloud, ek_pem: str | None, reason: str
) -> None:
    device = f"ins-ek-{reason[:6].replace('_', '')}"
    claim = fleet_of(cloud).create_claim(device)
    with new_device(cloud, device) as dev, pytest.raises(EnrollmentError) as e:
        stand_in = _StandIn(dev.keys, ek_pem if ek_pem is not None else _foreign_ek_cert())
        do_enroll(cloud, dev, claim, tpm=stand_in)
    assert e.value.reason == reason
    assert cloud.app.store.device(device) is None


def claim_for(cloud: Cloud, device: str) -> enroll.Claim:
    return fleet_of(cloud).create_claim(device)


@pytest.mark.parametrize("name", ["cloud-sidecar", "cloud-sidecar-ingest-1"])
def test_a_service_identity_cannot_be_claimed(cloud: Cloud, name: str) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        fleet_of(cloud).create_claim(name)


_PIN_SCRIPT = """
import sys, threading
from pathlib import Path
from types import SimpleNamespace
from cloud_sidecar.app import SidecarApp
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.config import HsmConfig
from cloud_sidecar.errors import HsmPinError
from cloud_sidecar.keys.hsm import Hsm

module, label, good, work = sys.argv[1:5]
for attempt in (1, 2):
    try:
        Hsm(module, label, "not-the-pin")
    except HsmPinError as e:
        print(f"attempt {attempt}: {e}")
pin = Path(work) / "pin"
pin.write_text("not-the-pin")
cfg = SimpleNamespace(
    hsm=HsmConfig(module=module, token_label=label, pin_file=pin, region="eu-west-1"), stall_s=30.0
)
app = SidecarApp(cfg)
app.hsm = SimpleNamespace(close=lambda: None)
app.audit = AuditLog(Path(work) / "audit.jsonl", "eu-west-1")
loop = threading.Thread(target=app._reopen_hsm, daemon=True)
loop.start()
loop.join(10)
print("loop alive:", loop.is_alive())
print("refused:", app.metrics.get("hsm_pin_refused_total"))
with Hsm(module, label, good) as hsm:
    hsm.ensure_keys()
    print("mac bytes:", len(hsm.claim_mac(b"x")))
"""


def test_a_wrong_hsm_pin_is_tried_once_and_the_reopen_loop_stops(tmp_path: Path) -> None:
    """In a child process: its own PKCS#11 library state and SoftHSM configuration."""
    token = init_token(tmp_path / "hsm", label="pin-test")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PIN_SCRIPT,
            str(token.module),
            token.label,
            token.user_pin,
            str(tmp_path),
        ],
        env={**os.environ, **token.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("attempt 1: token 'pin-test' refused the PIN")
    assert "not trying it again" in lines[1]
    assert "loop alive: False" in lines  # before issue 9: retried until the token locked
    assert "refused: 1" in lines
    assert "mac bytes: 32" in lines  # the token is not locked, and the claim MAC works
