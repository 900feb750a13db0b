"""The sidecar's sessions with its real components, opened from config: the HSM and the broker.

Every command (serve, train, fleet, ota, audit) opens them here, so none of them has to
import the composition root (``cloud_sidecar.app``). Invariants: the PKCS#11 module's
path and environment pass ``cloud_sidecar.trust`` and the environment is set before the
module loads; the broker link uses the sidecar's own mTLS
identity from ``cfg.broker`` (serve's, or the OTA publisher's for the OTA tree); nothing here retries (the caller owns the policy).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.errors import ConfigError
from cloud_sidecar.keys.hsm import Hsm
from cloud_sidecar.trust import check_hsm_env, check_pkcs11_module
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink


def open_hsm(cfg: SidecarConfig) -> Hsm:
    """The HSM session; the module path and its environment are checked first (trust.py)."""
    check_hsm_env(cfg.hsm.env)
    check_pkcs11_module(cfg.hsm.module)  # the path as configured: one library per process
    os.environ.update(cfg.hsm.env)  # the PKCS#11 module reads these when it loads
    return Hsm(str(cfg.hsm.module), cfg.hsm.token_label, cfg.hsm.pin())


def _ignore(_topic: str, _payload: bytes) -> None:
    return None


def open_link(
    cfg: SidecarConfig,
    client_id: str,
    on_message: Callable[[str, bytes], None] = _ignore,
    faults: LoopFaults | None = None,
    on_request: Callable[[str, bytes, str | None, bytes | None], None] | None = None,
    *,
    ota_publisher: bool = False,
) -> MqttLink:
    """A link as serve's identity, or with ``ota_publisher`` as the OTA publisher's (the
    only identity the broker lets write the OTA tree)."""
    b = cfg.broker
    cert, key = b.client_cert, b.client_key
    if ota_publisher:
        if b.ota_client_cert is None or b.ota_client_key is None:
            raise ConfigError("publishing OTA metadata needs broker.ota_client_cert and _key")
        cert, key = b.ota_client_cert, b.ota_client_key
    return MqttLink(
        MqttEndpoint(b.host, b.port, b.ca_cert, cert, key),
        client_id=client_id,
        on_message=on_message,
        faults=faults,
        on_request=on_request,
    )
