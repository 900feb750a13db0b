"""A PostgreSQL server from Debian's package, on a free loopback port: the sidecar's
second store implementation, for its contract tests.

Owns: ``initdb`` of a throw-away cluster, starting ``postgres`` as a ``ProcessGroup``
child (stopped by PID: SIGINT, PostgreSQL's fast shutdown, then the group's
SIGTERM/SIGKILL), creating databases and handing out libpq connection strings.

Invariants:
- it listens on 127.0.0.1 only, on a port the kernel picked, with no Unix socket
  outside its own directory; clients authenticate with SCRAM and a random password
  (never logged, not in ``repr``);
- PostgreSQL refuses to run as root: when we are root, the cluster belongs to the
  ``postgres`` system user (``nobody`` if there is none), lives in its own directory
  under the system temp dir (the caller's work dir is often unreadable to that user)
  and is removed on close; the server is started through ``setpriv``, which execs, so
  the recorded PID is the server's;
- binaries are found with ``pg_config --bindir``, else in ``/usr/lib/postgresql/<v>/bin``
  (Debian keeps them off PATH); missing ones raise ``ToolMissingError``
  (``scripts/bootstrap.sh`` installs the ``postgresql`` package).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from devstack.errors import ComponentStartError, ToolMissingError
from devstack.procs import Child, ProcessGroup, free_port, wait_for_port

log = logging.getLogger(__name__)

SUPERUSER = "sidecar"
_START_ATTEMPTS = 3


def find_bindir() -> Path:
    """The directory holding initdb and postgres."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates += [v / "bin" for v in reversed(versions)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    raise ToolMissingError("postgres (Debian package postgresql)")


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ComponentStartError("postgresql", "running as root and no postgres/nobody user")


@dataclass
class Postgres:
    """A running server: where it listens and how to reach it."""

    port: int
    data_dir: Path
    bindir: Path
    child: Child
    password: str = field(repr=False)
    user: str = SUPERUSER

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq connection string (with the password) for ``dbname``."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={self.user}"
            f" password={self.password}"
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its connection string."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        env = {**os.environ, "PGPASSWORD": self.password}
        argv = [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        proc = subprocess.run(
            [*argv, "-U", self.user, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise ComponentStartError("postgresql", f"createdb {name}: {proc.stderr.strip()}")
        return self.conninfo(name)


def start_postgres(procs: ProcessGroup, timeout: float = 30.0) -> Postgres:
    """initdb a fresh cluster and start it on a free loopback port."""
    bindir = find_bindir()
    owner = _run_as()
    data_root = Path(tempfile.mkdtemp(prefix="devstack-pg-"))
    data_dir = data_root / "data"
    password = secrets.token_urlsafe(24)
    pwfile = data_root / "pw"
    pwfile.write_text(password)
    os.chmod(pwfile, 0o600)
    prefix: list[str] = []
    if owner is not None:
        for p in (data_root, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ToolMissingError("setpriv (util-linux)")
        prefix = [setpriv, f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    init = subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        cwd=data_root,
    )
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(data_root, ignore_errors=True)
        raise ComponentStartError("postgresql", f"initdb failed: {init.stderr.strip()[-500:]}")
    reason = "not started"
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        argv = [
            *prefix,
            str(bindir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={data_root}",
            "-c",
            "fsync=off",  # a throw-away test cluster; the store's own ordering is unchanged
            "-c",
            "max_connections=40",
        ]
        child = procs.start(f"postgres-{port}", argv, cwd=data_root)
        if wait_for_port(port, timeout, alive=child.alive):
            log.debug("postgres up on 127.0.0.1:%s (attempt %s)", port, attempt)
            return Postgres(port, data_dir, bindir, child, password)
        procs.stop(child)
        reason = child.log_tail().strip() or "no output"
    shutil.rmtree(data_root, ignore_errors=True)
    raise ComponentStartError("postgresql", reason)


def stop_postgres(procs: ProcessGroup, server: Postgres) -> None:
    """Fast shutdown by PID, then remove the cluster's directory."""
    if server.child.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.child.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.child.popen.wait(10)
    procs.stop(server.child)
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)


class PostgresServer:
    """``with PostgresServer(log_dir) as pg:`` a server for the duration of the block."""

    def __init__(self, log_dir: Path) -> None:
        self.procs = ProcessGroup(log_dir)
        self.server: Postgres | None = None

    def __enter__(self) -> Postgres:
        try:
            self.server = start_postgres(self.procs)
        except BaseException:
            self.procs.close()
            raise
        return self.server

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.server is not None:
            stop_postgres(self.procs, self.server)
        self.procs.close()
