"""A SoftHSM2 token in a private directory: the cloud's embedded PKCS#11 HSM.

Owns: writing a ``softhsm2.conf`` whose token directory lies inside ``workdir``,
initialising one token in it with random PINs, and locating the PKCS#11 module.

Invariants:
- nothing is written outside ``workdir`` (conf file 0600, token dir 0700);
- every process that uses the token must have ``SOFTHSM2_CONF`` (``HsmToken.env()``)
  in its environment before the PKCS#11 library is loaded;
- the PINs are random per token and never appear in ``repr`` or in logs;
- one token per ``workdir``: initialising into a non-empty token directory fails
  rather than creating a second token with the same label.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from devstack.errors import ComponentStartError, ToolMissingError
from devstack.procs import require_tool

log = logging.getLogger(__name__)

_MODULE_ENV = "SOFTHSM2_MODULE"
_MODULE_NAME = "libsofthsm2.so"


@dataclass(frozen=True)
class HsmToken:
    """Where a SoftHSM2 token is and how to log in to it."""

    module: Path
    conf: Path
    label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """Environment every process using this token needs (before loading the module)."""
        return {"SOFTHSM2_CONF": str(self.conf)}


def find_module() -> Path:
    """Path of the SoftHSM2 PKCS#11 module (``$SOFTHSM2_MODULE`` overrides the search)."""
    override = os.environ.get(_MODULE_ENV)
    candidates = [Path(override)] if override else []
    machine = platform.machine()
    multiarch = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, "")
    candidates += [
        Path("/usr/lib/softhsm") / _MODULE_NAME,
        Path("/usr/lib") / multiarch / "softhsm" / _MODULE_NAME,
        Path("/usr/local/lib/softhsm") / _MODULE_NAME,
        Path("/usr/lib64/pkcs11") / _MODULE_NAME,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise ToolMissingError(_MODULE_NAME)


def init_token(workdir: Path, label: str = "sovereign-cloud") -> HsmToken:
    """Create a fresh SoftHSM2 token labelled ``label`` under ``workdir``."""
    util = require_tool("softhsm2-util")
    module = find_module()
    workdir.mkdir(parents=True, exist_ok=True)
    tokendir = workdir / "tokens"
    tokendir.mkdir(mode=0o700, exist_ok=True)
    if any(tokendir.iterdir()):
        raise ComponentStartError("softhsm", f"token directory {tokendir} is not empty")
    conf = workdir / "softhsm2.conf"
    conf_text = (
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(conf_text)
    token = HsmToken(
        module=module,
        conf=conf,
        label=label,
        user_pin=secrets.token_hex(16),
        so_pin=secrets.token_hex(16),
    )
    argv = [util, "--init-token", "--free", "--label", label]
    argv += ["--pin", token.user_pin, "--so-pin", token.so_pin]
    try:
        result = subprocess.run(
            argv,
            env={**os.environ, **token.env()},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ComponentStartError("softhsm", "softhsm2-util --init-token timed out") from e
    if result.returncode != 0:
        out = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise ComponentStartError("softhsm", f"softhsm2-util exited {result.returncode}: {out}")
    log.debug("softhsm token %r initialised in %s (module %s)", label, tokendir, module)
    return token
