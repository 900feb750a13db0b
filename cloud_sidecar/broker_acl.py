"""The production broker ACL for an operator's Mosquitto, and the sidecar's own identity.

``cloud-sidecar broker-acl --config cloud.json --label-source NAME ... --out FILE``
writes ``fleet_protocol.acl.broker_acl`` for the admin identity ``serve`` connects
as (the CN of ``broker.client_cert``), the OTA publisher (the CN of
``broker.ota_client_cert``, which must differ) and the given label sources; ``--enroll-out``
also writes the enrollment listener's ACL. Invariants: the certificate is read with a
byte cap; the files are written atomically (temp, fsync, rename); any invalid or
reserved identity is a ``ConfigError`` naming it, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.errors import ConfigError
from fleet_protocol import acl
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic

MAX_CERT_BYTES = 64 * 1024


def identity_of(cert_path: Path) -> str:
    """The CN of a PEM certificate: the MQTT username the broker gives its holder."""
    try:
        with cert_path.open("rb") as f:
            data = f.read(MAX_CERT_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {cert_path}: {e.strerror}") from e
    if len(data) > MAX_CERT_BYTES:
        raise ConfigError(f"{cert_path} is larger than {MAX_CERT_BYTES} bytes")
    try:
        names = x509.load_pem_x509_certificate(data).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
    except ValueError as e:
        raise ConfigError(f"{cert_path} is not a PEM certificate: {e}") from e
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise ConfigError(f"{cert_path} does not name exactly one CN")
    return names[0].value


def admin_identity(cfg: SidecarConfig) -> str:
    """The identity this sidecar connects to the broker as."""
    return identity_of(cfg.broker.client_cert)


def ota_publisher_identity(cfg: SidecarConfig) -> str | None:
    """The identity OTA metadata is published as (``broker.ota_client_cert``), if any;
    ``ConfigError`` when it is serve's own (the split would be void)."""
    if cfg.broker.ota_client_cert is None:
        return None
    name = identity_of(cfg.broker.ota_client_cert)
    if name == admin_identity(cfg):
        raise ConfigError(f"broker.ota_client_cert has serve's own CN {name!r}: use another")
    return name


def write_broker_acl(
    cfg: SidecarConfig,
    label_sources: Sequence[str],
    out: Path,
    enroll_out: Path | None = None,
    service_out: Path | None = None,
) -> str:
    """Write the device listener's ACL (and the enrollment and service listeners'); return
    the device listener's text."""
    publisher = ota_publisher_identity(cfg)
    publishers = [] if publisher is None else [publisher]
    try:
        text = acl.broker_acl([admin_identity(cfg)], label_sources, ota_publishers=publishers)
        service = acl.service_acl([admin_identity(cfg)], publishers)
    except ProtocolError as e:
        raise ConfigError(f"broker ACL: {e}") from e
    write_atomic(out, text.encode(), 0o644)
    if enroll_out is not None:
        write_atomic(enroll_out, acl.enroll_acl().encode(), 0o644)
    if service_out is not None:
        write_atomic(service_out, service.encode(), 0o644)
    return text


__all__ = ["admin_identity", "identity_of", "ota_publisher_identity", "write_broker_acl"]
