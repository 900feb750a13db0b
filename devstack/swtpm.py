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
  own swtpm, and keep one ``TpmKeyStore`` open per swtpm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from devstack.errors import ComponentStartError
from devstack.procs import Child, ProcessGroup, free_port_pair, require_tool, wait_for_port

log = logging.getLogger(__name__)

_START_ATTEMPTS = 3


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


def start_swtpm(procs: ProcessGroup, state_dir: Path, timeout: float = 10.0) -> Swtpm:
    """Start swtpm on a free adjacent port pair, keeping its state in ``state_dir``.

    Retries on another port pair if the chosen one was taken between allocation
    and bind. Raises ``ToolMissingError`` when swtpm is not installed and
    ``ComponentStartError`` when it does not come up within ``timeout`` seconds.
    """
    exe = require_tool("swtpm")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
