"""Config is code: what a sidecar configuration may make the process load, run or allow.

Whoever writes the config file would otherwise choose the PKCS#11 module loaded into the
process that holds the HSM PIN, that module's environment, the program run after each
revocation, and the residency policy. Owns the checks that bound each (issue 9):

- the config file (``check_config_file``): a regular file owned by root or the service
  user, writable by nobody else, in a directory nobody else may write to (sticky
  directories excepted), checked by ``load_config`` before it is read;
- the PKCS#11 module (``check_pkcs11_module``): an absolute path that resolves (symlinks
  followed) into one of ``PKCS11_MODULE_DIRS`` (where Debian's softhsm2 and the
  Luna, Utimaco, CloudHSM and YubiHSM clients install), to a regular file owned by root
  or the service user and writable by nobody else; checked before the module loads;
- the module's environment (``check_hsm_env``): only ``HSM_ENV_VARS`` (the vendors'
  configuration-file variables), never ``LD_PRELOAD`` and friends;
- the CRL hook (``check_hook``): argv[0] an absolute path to a regular executable owned by
  root or the service user and writable by nobody else (no ``$PATH`` lookup, no shell);
- the residency policy: ``residency.allowed_regions`` may only narrow the built-in EU
  list (``cloud_sidecar.config.ResidencyConfig``), never widen it.

Every refusal is a ``ConfigError`` naming the setting. Invariant: nothing a config names
is loaded or run before these checks passed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloud_sidecar.errors import ConfigError

PKCS11_MODULE_DIRS: tuple[Path, ...] = (
    Path("/usr/lib"),  # Debian: /usr/lib/softhsm, /usr/lib/<multiarch>/{softhsm,pkcs11}
    Path("/usr/lib64"),
    Path("/usr/local/lib"),
    Path("/usr/safenet/lunaclient/lib"),  # Thales Luna
    Path("/opt/utimaco"),  # Utimaco CryptoServer
    Path("/opt/cloudhsm/lib"),  # AWS CloudHSM
)
HSM_ENV_VARS = frozenset(
    {
        "SOFTHSM2_CONF",  # SoftHSM2
        "ChrystokiConfigurationPath",  # Thales Luna
        "CS_PKCS11_R3_CFG",  # Utimaco
        "YUBIHSM_PKCS11_CONF",  # YubiHSM 2
    }
)
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _check_not_writable_by_others(path: Path, what: str, st: os.stat_result) -> None:
    if not _trusted_owner(st):
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not root or this user")
    if st.st_mode & _OTHERS_WRITE:
        raise ConfigError(f"{what} {path} is writable by group or others (mode {st.st_mode:o})")


def check_config_file(path: Path) -> None:
    """The config file and its directory can be changed only by root or this user."""
    try:
        st = path.stat()
        parent = path.resolve().parent.stat()
    except OSError as e:
        raise ConfigError(f"cannot stat config {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config {path} is not a regular file")
    _check_not_writable_by_others(path, "config", st)
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise ConfigError(f"config {path} lies in a directory anyone may write to")


def check_pkcs11_module(module: Path, allowed: Sequence[Path] = PKCS11_MODULE_DIRS) -> Path:
    """The resolved module path, if it is an allow-listed, trusted regular file."""
    if not module.is_absolute():
        raise ConfigError(f"hsm.module {module} is not an absolute path")
    real = module.resolve()
    if not any(real.is_relative_to(d) for d in allowed):
        dirs = ", ".join(str(d) for d in allowed)
        raise ConfigError(f"hsm.module {module} ({real}) is not under an allowed path ({dirs})")
    try:
        st = real.stat()
    except OSError as e:
        raise ConfigError(f"hsm.module {module}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"hsm.module {module} is not a regular file")
    _check_not_writable_by_others(real, "hsm.module", st)
    return real


def check_hsm_env(env: Mapping[str, str]) -> None:
    bad = sorted(set(env) - HSM_ENV_VARS)
    if bad:
        raise ConfigError(
            f"hsm.env may set only {sorted(HSM_ENV_VARS)}; refusing {', '.join(bad)[:200]}"
        )


def check_hook(argv: Sequence[str]) -> None:
    """A CRL hook runs as a program path the config cannot swap for a writable one."""
    if not argv:
        return
    prog = Path(argv[0])
    if not prog.is_absolute():
        raise ConfigError(f"fleet.crl_hook[0] {argv[0][:200]!r} is not an absolute path")
    try:
        st = prog.resolve().stat()
    except OSError as e:
        raise ConfigError(f"fleet.crl_hook[0] {prog}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IXUSR:
        raise ConfigError(f"fleet.crl_hook[0] {prog} is not an executable file")
    _check_not_writable_by_others(prog, "fleet.crl_hook[0]", st)


__all__ = [
    "HSM_ENV_VARS",
    "PKCS11_MODULE_DIRS",
    "check_config_file",
    "check_hook",
    "check_hsm_env",
    "check_pkcs11_module",
]
