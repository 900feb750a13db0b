"""A real Mosquitto 2.0 broker on loopback with mutual TLS, per-device ACL and a CRL.

Owns the broker's working directory::

    mosquitto.conf  acl  ca.pem  crl.pem  broker.pem  broker.key
    acl-enroll  claim-ca.pem  claim-crl.pem          (with a claim CA)

Invariants:
- the broker reads only copies in its working directory, never the CA's directory
  (which holds the CA key); ``reload_broker`` refreshes the CRL copy from the CA
  atomically before it sends SIGHUP, and returns once the broker has reloaded;
- the device listener on 127.0.0.1, TLS 1.3 only, a client certificate from the fleet
  CA is required and its CN is the MQTT username; no anonymous access, no persistence;
- with a claim CA, a second, *enrollment* listener (``per_listener_settings true``)
  accepts only certificates of the claim CA (its own cafile and CRL) and has its own
  ACL: a claim holder writes its own enrollment request and reads its own response,
  nothing else. A claim certificate fails the device listener's handshake and a device
  certificate the enrollment listener's, so the shared claim credential can do
  nothing but enroll (docs/adr/0007). Both listeners share one topic tree;
- the ACLs are ``fleet_protocol.acl``'s, rendered from ``fleet_protocol.topics`` (no
  topic name is spelled here): admin identities (the sidecar) read and write only the
  topics the sidecar uses; a device (CN = device id) writes only its own upload,
  events, telemetry, OTA status and certificate request and reads only its own ack and
  certificate response and the OTA tree; each label source writes only its own labels
  topic and reads only its result; without a claim CA (single listener), an enrolling
  device (shared claim certificate, client id = its session channel) is confined by the enrollment
  patterns, but also matches the device patterns;
- with a service CA, a third, *service* listener accepts only that CA's certificates
  (the sidecar's) with its own ACL (``fleet_protocol.acl.service_acl``) and free client
  ids, and the device listener sets ``use_username_as_clientid``: a device's client id
  is its CN, so no device can take over another device's session (issue 9);
- observers (tests only; ``cloud-sidecar broker-acl`` has no such option) may read
  every topic and write none, so a test can see what reached the broker;
- run as root, Mosquitto drops to user ``mosquitto`` (``nobody`` when that user does
  not exist) after binding; every file it reads, on start and on SIGHUP, must then be
  reachable by that user: the working directory and its files are made readable, the
  broker key is chowned to that user, and ``start_broker`` refuses a working directory
  whose parents that user cannot traverse (pytest's ``tmp_path`` is such a place);
- each MQTT packet is capped at ``max_packet_bytes`` (the broker drops clients that
  send larger ones);
- the broker is a child of the caller's ``ProcessGroup`` and is stopped by its PID;
  ``restart_broker`` starts it again from the same working directory (same port(s),
  certificates and ACL; the CRL copy refreshed as on reload) after ``stop_broker`` or a
  crash, and ``broker.child`` is then the new process.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.errors import ComponentStartError
from devstack.pki import IDENTITY_RE, DevCA
from devstack.procs import Child, ProcessGroup, free_port, require_tool, wait_for_port
from fleet_protocol import acl
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

MAX_PACKET_BYTES = 16 * 1024 * 1024
DROP_USER = "mosquitto"
_READY_LINE = re.compile(r"mosquitto version \S+ running$", re.MULTILINE)
_RELOAD_LINE = re.compile(r"Reloading config\.$", re.MULTILINE)
_START_ATTEMPTS = 3


@dataclass
class Broker:
    """A running broker. ``crl`` is the broker's copy; ``crl_source`` the CA's CRL."""

    host: str
    port: int
    ca_cert: Path
    crl: Path
    child: Child
    config_path: Path
    crl_source: Path
    workdir: Path
    enroll_port: int | None = None  # the enrollment listener (claim CA), when there is one
    claim_ca_cert: Path | None = None
    service_port: int | None = None  # the service listener (service CA), when there is one


def enroll_acl_text() -> str:
    """The enrollment listener's ACL: a claim holder's own enroll request and response only."""
    return acl.enroll_acl()


def acl_text(
    admin_identities: Sequence[str],
    enroll_patterns: bool = True,
    label_sources: Sequence[str] = (),
    observers: Sequence[str] = (),
    ota_publishers: Sequence[str] = (),
) -> str:
    """The device listener's ACL (``fleet_protocol.acl.broker_acl``) plus test observers."""
    try:
        text = acl.broker_acl(
            admin_identities,
            label_sources,
            enrollment=enroll_patterns,
            ota_publishers=ota_publishers,
        )
    except ProtocolError as e:
        raise ComponentStartError("mosquitto", str(e)) from e
    for name in observers:
        if not IDENTITY_RE.fullmatch(name) or name in (*admin_identities, *label_sources):
            raise ComponentStartError("mosquitto", f"invalid observer identity {name[:70]!r}")
        text += f"\n# observer (tests only): reads everything, writes nothing\nuser {name}\n"
        text += "topic read #\n"
    return text


def config_text(
    workdir: Path,
    port: int,
    max_packet_bytes: int,
    user: str | None,
    enroll_port: int | None = None,
    service_port: int | None = None,
) -> str:
    """The broker configuration (option names as in mosquitto.conf(5) of 2.0.11).

    Security settings are per listener (``per_listener_settings true``): each listener
    names its own ``allow_anonymous`` and ``acl_file``; TLS options are per listener
    anyway. With ``enroll_port`` a second listener serves enrollment only.
    """
    lines = [
        "# generated by devstack.mosquitto",
        "per_listener_settings true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"max_packet_size {max_packet_bytes}",
    ]
    if user is not None:
        lines.append(f"user {user}")
    lines += [
        "",
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"acl_file {workdir / 'acl'}",
        f"cafile {workdir / 'ca.pem'}",
        f"certfile {workdir / 'broker.pem'}",
        f"keyfile {workdir / 'broker.key'}",
        f"crlfile {workdir / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.3",
    ]
    if service_port is not None:
        lines += [
            "# the client id is the certificate's CN: no device can take over another's session",
            "use_username_as_clientid true",
            "",
            "# services only (the sidecar): the service CA, free client ids, admin ACL",
            f"listener {service_port} 127.0.0.1",
            "allow_anonymous false",
            f"acl_file {workdir / 'acl-service'}",
            f"cafile {workdir / 'service-ca.pem'}",
            f"certfile {workdir / 'broker.pem'}",
            f"keyfile {workdir / 'broker.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.3",
        ]
    if enroll_port is not None:
        lines += [
            "",
            "# enrollment only: claim certificates, their own CA, CRL and ACL",
            f"listener {enroll_port} 127.0.0.1",
            "allow_anonymous false",
            f"acl_file {workdir / 'acl-enroll'}",
            f"cafile {workdir / 'claim-ca.pem'}",
            f"certfile {workdir / 'broker.pem'}",
            f"keyfile {workdir / 'broker.key'}",
            f"crlfile {workdir / 'claim-crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.3",
        ]
    return "\n".join(lines) + "\n"


def _drop_user() -> pwd.struct_passwd | None:
    """The user Mosquitto will run as when we are root, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in (DROP_USER, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ComponentStartError("mosquitto", "running as root but neither mosquitto nor nobody exist")


def _allowed(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def _check_reachable(directory: Path, user: pwd.struct_passwd) -> None:
    """Raise unless ``user`` can traverse every parent of ``directory`` and the dir itself."""
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    xbits = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    for d in [directory, *directory.parents]:
        if not _allowed(d.stat(), user.pw_uid, gids, xbits):
            raise ComponentStartError(
                "mosquitto",
                f"user {user.pw_name} (the broker drops to it) cannot traverse {d}; "
                f"use a working directory whose parents are world-executable, not {directory}",
            )


def _copy(src: Path, dst: Path, mode: int) -> None:
    data = src.read_bytes()
    write_atomic(dst, data, mode)


def _count(child: Child, needle: re.Pattern[str]) -> int:
    try:
        return len(needle.findall(child.log_path.read_text(errors="replace")))
    except OSError:
        return 0


def _wait_log(child: Child, needle: re.Pattern[str], count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(child, needle) >= count:
            return True
        if not child.alive():
            return False
        time.sleep(0.02)
    return False


def start_broker(
    procs: ProcessGroup,
    workdir: Path,
    ca: DevCA,
    admin_identities: Sequence[str] = ("cloud-sidecar",),
    timeout: float = 10.0,
    *,
    max_packet_bytes: int = MAX_PACKET_BYTES,
    claim_ca: DevCA | None = None,
    label_sources: Sequence[str] = (),
    observers: Sequence[str] = (),
    service_ca: DevCA | None = None,
    ota_publishers: Sequence[str] = (),
) -> Broker:
    """Start Mosquitto with mTLS on a free loopback port and wait until it serves.

    With ``claim_ca`` a second listener on another free port accepts only that CA's
    (claim) certificates, for enrollment only; the device listener then has no
    enrollment patterns. ``label_sources`` and ``observers`` name identities the ACL
    admits as such (their certificates are the caller's to issue).
    """
    exe = require_tool("mosquitto")
    workdir = workdir.resolve()
    if any(c.isspace() for c in str(workdir)):
        raise ComponentStartError("mosquitto", f"working directory has whitespace: {workdir}")
    user = _drop_user()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    if user is not None:
        _check_reachable(workdir, user)

    server = ca.issue_server("broker", hosts=("localhost", "127.0.0.1"))
    _copy(ca.cert_path, workdir / "ca.pem", 0o644)
    _copy(ca.crl_path, workdir / "crl.pem", 0o644)
    _copy(server.cert, workdir / "broker.pem", 0o644)
    _copy(server.key, workdir / "broker.key", 0o600)
    if user is not None:
        os.chown(workdir / "broker.key", user.pw_uid, user.pw_gid)
    text = acl_text(admin_identities, claim_ca is None, label_sources, observers, ota_publishers)
    write_atomic(workdir / "acl", text.encode(), 0o644)
    if claim_ca is not None:
        _copy(claim_ca.cert_path, workdir / "claim-ca.pem", 0o644)
        _copy(claim_ca.crl_path, workdir / "claim-crl.pem", 0o644)
        write_atomic(workdir / "acl-enroll", enroll_acl_text().encode(), 0o644)
    if service_ca is not None:
        _copy(service_ca.cert_path, workdir / "service-ca.pem", 0o644)
        service = acl.service_acl(admin_identities, ota_publishers)
        write_atomic(workdir / "acl-service", service.encode(), 0o644)

    config_path = workdir / "mosquitto.conf"
    last_reason = ""
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        enroll_port = None if claim_ca is None else free_port()
        while enroll_port == port:
            enroll_port = free_port()
        service_port = None if service_ca is None else free_port()
        while service_port is not None and service_port in (port, enroll_port):
            service_port = free_port()
        user_name = user.pw_name if user else None
        text = config_text(workdir, port, max_packet_bytes, user_name, enroll_port, service_port)
        write_atomic(config_path, text.encode(), 0o644)
        # Count before the start: a broker that logs "running" before we look (a loaded
        # CPU) would otherwise be awaited for a second "running" that never comes.
        log_path = procs.log_dir / f"mosquitto-{port}.log"
        ready_before = (
            len(_READY_LINE.findall(log_path.read_text(errors="replace")))
            if log_path.exists()
            else 0
        )
        child = procs.start(f"mosquitto-{port}", [exe, "-c", str(config_path)])
        up = (
            wait_for_port(port, timeout, alive=child.alive)
            and (enroll_port is None or wait_for_port(enroll_port, timeout, alive=child.alive))
            and (service_port is None or wait_for_port(service_port, timeout, alive=child.alive))
            and _wait_log(child, _READY_LINE, ready_before + 1, timeout)
        )
        if up and child.alive():
            log.info(
                "mosquitto pid=%s listening on 127.0.0.1:%s (mTLS), enrollment on %s",
                child.pid,
                port,
                enroll_port,
            )
            return Broker(
                host="127.0.0.1",
                port=port,
                ca_cert=workdir / "ca.pem",
                crl=workdir / "crl.pem",
                child=child,
                config_path=config_path,
                crl_source=ca.crl_path,
                workdir=workdir,
                enroll_port=enroll_port,
                claim_ca_cert=None if claim_ca is None else workdir / "claim-ca.pem",
                service_port=service_port,
            )
        tail = child.log_tail()
        procs.stop(child)
        last_reason = f"attempt {attempt} on port {port} failed; log tail:\n{tail}"
        if "Address already in use" not in tail:
            break
        log.debug("mosquitto port %s was taken; retrying", port)
    raise ComponentStartError("mosquitto", last_reason)


def reload_broker(broker: Broker, timeout: float = 5.0) -> None:
    """Refresh the broker's CRL copy from the CA, SIGHUP it, wait until it has reloaded.

    Mosquitto re-reads the ACL file and the listener's certificates and CRL on SIGHUP.
    """
    if not broker.child.alive():
        raise ComponentStartError("mosquitto", f"broker is not running:\n{broker.child.log_tail()}")
    _copy(broker.crl_source, broker.crl, 0o644)
    before = _count(broker.child, _RELOAD_LINE)
    os.kill(broker.child.pid, signal.SIGHUP)
    if not _wait_log(broker.child, _RELOAD_LINE, before + 1, timeout):
        raise ComponentStartError(
            "mosquitto", f"no reload within {timeout}s:\n{broker.child.log_tail()}"
        )
    log.debug("mosquitto pid=%s reloaded (CRL %s)", broker.child.pid, broker.crl)


def stop_broker(procs: ProcessGroup, broker: Broker) -> None:
    """Stop the broker by its PID (SIGTERM, then SIGKILL): an outage until ``restart_broker``.

    Mosquitto keeps no sessions across it (``persistence false``): clients reconnect and
    subscribe again, and a message published before a subscriber is back reaches no one.
    """
    procs.stop(broker.child)
    log.info("mosquitto pid=%s stopped (port %s)", broker.child.pid, broker.port)


def restart_broker(procs: ProcessGroup, broker: Broker, timeout: float = 10.0) -> None:
    """Start the broker again on the same port(s), with the same certificates and ACL.

    A running broker is stopped first. The CRL copy is refreshed from the CA as on reload.
    ``broker.child`` becomes the new process: a ``crl_hook_argv`` taken before names the
    old PID. Raises ``ComponentStartError`` when it does not serve within ``timeout``
    (another process may have taken the port meanwhile: the log tail says so).
    """
    if broker.child.alive():
        procs.stop(broker.child)
    exe = require_tool("mosquitto")
    _copy(broker.crl_source, broker.crl, 0o644)
    name = f"mosquitto-{broker.port}"
    log_path = procs.log_dir / f"{name}.log"
    old_log = log_path.read_text(errors="replace") if log_path.exists() else ""
    ready_before = len(_READY_LINE.findall(old_log))
    child = procs.start(name, [exe, "-c", str(broker.config_path)])
    up = (
        wait_for_port(broker.port, timeout, alive=child.alive)
        and (
            broker.enroll_port is None
            or wait_for_port(broker.enroll_port, timeout, alive=child.alive)
        )
        and _wait_log(child, _READY_LINE, ready_before + 1, timeout)
    )
    if not (up and child.alive()):
        tail = child.log_tail()
        procs.stop(child)
        raise ComponentStartError("mosquitto", f"restart on port {broker.port} failed:\n{tail}")
    broker.child = child
    log.info("mosquitto pid=%s listening again on 127.0.0.1:%s", child.pid, broker.port)


def crl_hook_argv(broker: Broker) -> list[str]:
    """argv for the sidecar's ``fleet.crl_hook``: ``reload_broker`` from another process.

    The sidecar appends the CRL path; the hook copies it into the broker's working
    directory, sends SIGHUP and waits for the broker's reload line.
    """
    argv = [sys.executable, "-m", "devstack.mosquitto", "reload-crl"]
    return [*argv, str(broker.crl), str(broker.child.pid), str(broker.child.log_path)]


def _reload_crl_main(argv: Sequence[str], timeout: float = 5.0) -> int:
    broker_crl, pid, log_path, crl_source = argv

    def reloads() -> int:
        return len(_RELOAD_LINE.findall(Path(log_path).read_text(errors="replace")))

    before = reloads()
    _copy(Path(crl_source), Path(broker_crl), 0o644)
    os.kill(int(pid), signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while reloads() <= before:
        if time.monotonic() > deadline:
            print(f"mosquitto pid {pid} did not reload within {timeout}s", file=sys.stderr)
            return 1
        time.sleep(0.02)
    return 0


__all__ = [
    "Broker",
    "acl_text",
    "config_text",
    "crl_hook_argv",
    "enroll_acl_text",
    "reload_broker",
    "restart_broker",
    "start_broker",
    "stop_broker",
]

if __name__ == "__main__" and sys.argv[1:2] == ["reload-crl"]:
    sys.exit(_reload_crl_main(sys.argv[2:]))
