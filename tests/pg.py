"""A throwaway PostgreSQL cluster for the tests of the PostgreSQL engine (issue 15).

The ``postgres_server`` fixture is session-scoped: the first test that asks for it runs Debian's ``initdb`` and
``pg_ctl`` (from ``/usr/lib/postgresql/*/bin``, which ``./dev test`` installs) as the non-root user
``replika-pg`` (PostgreSQL refuses to run as root), with its data directory under a temporary directory that user
owns, listening on 127.0.0.1 only on a free port, with ``fsync=on`` so that what a test sees committed is what a
real deployment would have on disk. The cluster is stopped (``pg_ctl stop -m fast``) when the session ends.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PG_USER", "PostgresServer", "find_bindir", "postgres_server"]

#: The operating-system user the test cluster runs as (and its superuser role).
PG_USER = "replika-pg"


@dataclass(frozen=True)
class PostgresServer:
    """A running test cluster: ``url`` is a libpq URL of its ``postgres`` database as the superuser."""

    host: str
    port: int
    user: str
    datadir: Path

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        """The libpq URL of ``database`` on this cluster."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has ``initdb``; skips the test when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.skip("PostgreSQL is not installed: ./dev test installs Debian's postgresql package")
    return Path(found[-1]).parent


def _ensure_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_USER)
    if os.geteuid() != 0:
        pytest.skip(f"the user {PG_USER} is missing and only root can create it")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
    return pwd.getpwnam(PG_USER)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_user(user: pwd.struct_passwd, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (dropping root) and fail with its output when it fails."""
    done = subprocess.run(
        argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=120
    )
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresServer]:
    """Initialise and start a cluster in a fresh temporary directory; stop it and remove the directory at exit."""
    bindir = find_bindir()
    user = _ensure_user()
    root = Path(tempfile.mkdtemp(prefix="replika-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    datadir, port = root / "data", _free_port()
    try:
        _as_user(user, [str(bindir / "initdb"), "-D", str(datadir), "-U", PG_USER, "--auth=trust", "-E", "UTF8"])
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=on -c max_connections=200"
        log = root / "server.log"
        _as_user(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-o", options, "-w", "start"])
        try:
            yield PostgresServer("127.0.0.1", port, PG_USER, datadir)
        finally:
            _as_user(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole test session, started the first time a test asks for it."""
    with running_cluster() as server:
        yield server
