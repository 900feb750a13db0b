"""One software TPM 2.0 (``swtpm``) per simulated device, on loopback TCP.

Owns: starting a ``swtpm socket --tpm2`` child through a ``ProcessGroup`` and
telling callers the TCTI string that tpm2-pytss uses to reach it.

Invariants:
- the server and control ports are adjacent (P, P+1) on 127.0.0.1 only;
- the TPM state lives in ``state_dir``: starting swtpm again on the same
  directory gives the same TPM (same owner seed, so the same primary keys and
  loadable key blobs) -- a restarted device keeps its keys;
- the TPM is started (``TPM2_Startup(CLEAR)``) by swtpm itself, so the first
  client command works without a control-channel INIT;
- a swtpm socket serves one client connection at a time: give each device its
  own swtpm, and keep one ``TpmKeyStore`` open per swtpm;
- with ``ek_ca_dir``, a new TPM is manufactured first (``swtpm_setup --create-ek-cert``):
  its RSA-2048 EK certificate, issued by a local CA kept in ``ek_ca_dir``
  (``swtpm_localca``: ``issuercert.pem`` is what the cloud trusts as the "manufacturer",
  ``EK_CA_CERT``), sits in NV as on a factory TPM (ADR 0018: credential activation).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack.errors import ComponentStartError
from devstack.procs import Child, ProcessGroup, free_port_pair, require_tool, wait_for_port

log = logging.getLogger(__name__)

_START_ATTEMPTS = 3
EK_CA_CERT = "issuercert.pem"


def manufacture(state_dir: Path, ek_ca_dir: Path, timeout: float = 60.0) -> None:
    """Give a TPM state an EK and its certificate from the local CA in ``ek_ca_dir``."""
    if (state_dir / "tpm2-00.permall").exists():
        return  # already manufactured: a restarted device keeps its TPM
    setup = require_tool("swtpm_setup")
    localca = require_tool("swtpm_localca")
    ek_ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_conf, setup_conf = ek_ca_dir / "swtpm-localca.conf", ek_ca_dir / "swtpm_setup.conf"
    ca_conf.write_text(
        f"statedir = {ek_ca_dir}\nsigningkey = {ek_ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ek_ca_dir / EK_CA_CERT}\ncertserial = {ek_ca_dir / 'certserial'}\n"
    )
    (ek_ca_dir / "swtpm-localca.options").write_text(
        "--platform-manufacturer sovereign-edge\n--platform-version 1\n--platform-model devstack\n"
    )
    setup_conf.write_text(
        f"create_certs_tool = {localca}\ncreate_certs_tool_config = {ca_conf}\n"
        f"create_certs_tool_options = {ek_ca_dir / 'swtpm-localca.options'}\n"
        "active_pcr_banks = sha256\n"
    )
    argv = [setup, "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert"]
    out = subprocess.run(
        [*argv, "--config", str(setup_conf), "--not-overwrite"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise ComponentStartError("swtpm_setup", (out.stderr or out.stdout)[-2000:])


@dataclass
class Swtpm:
    """A running swtpm child: where it listens and where it keeps its state."""

    port: int
    ctrl_port: int
    state_dir: Path
    child: Child

    @property
    def tcti(self) -> str:
        """TCTI configuration string understood by tpm2-pytss (``ESAPI(tcti)``)."""
        return f"swtpm:host=127.0.0.1,port={self.port}"


def start_swtpm(
    procs: ProcessGroup, state_dir: Path, timeout: float = 10.0, ek_ca_dir: Path | None = None
) -> Swtpm:
    """Start swtpm on a free adjacent port pair, keeping its state in ``state_dir``.

    Retries on another port pair if the chosen one was taken between allocation
    and bind. Raises ``ToolMissingError`` when swtpm is not installed and
    ``ComponentStartError`` when it does not come up within ``timeout`` seconds.
    """
    exe = require_tool("swtpm")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ek_ca_dir is not None:
        manufacture(state_dir, ek_ca_dir)
    reason = "not started"
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port_pair()
        argv = [
            exe,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state_dir}",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
        ]
        child = procs.start(f"swtpm-{state_dir.name}-{port}", argv)
        if wait_for_port(port, timeout, alive=child.alive):
            log.debug("swtpm up on port %s (state %s, attempt %s)", port, state_dir, attempt)
            return Swtpm(port=port, ctrl_port=port + 1, state_dir=state_dir, child=child)
        alive = child.alive()
        procs.stop(child)
        reason = child.log_tail().strip() or "no output"
        if alive:
            # Still running but never listened: not a port race; retrying won't help.
            break
        log.debug("swtpm on port %s exited early (attempt %s): %s", port, attempt, reason)
    raise ComponentStartError("swtpm", reason)
