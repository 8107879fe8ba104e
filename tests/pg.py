"""A throwaway PostgreSQL cluster for the tests of the PostgreSQL engine (issue 15).

The ``postgres_server`` fixture is session-scoped: the first test that asks for it runs Debian's ``initdb`` and
``pg_ctl`` (from ``/usr/lib/postgresql/*/bin``, which ``./dev test`` installs) as the non-root user
``replika-pg`` (PostgreSQL refuses to run as root), with its data directory under a temporary directory that user
owns, listening on 127.0.0.1 only on a free port, with ``fsync=on`` so that what a test sees committed is what a
real deployment would have on disk. The cluster is stopped (``pg_ctl stop -m fast``) when the session ends.

The ``replicated_postgres`` fixture is function-scoped: a fresh primary and a synchronous streaming standby, for
the failover test, which promotes one and stops the other.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

__all__ = [
    "PG_USER",
    "STANDBY_NAME",
    "PostgresServer",
    "ReplicatedPair",
    "find_bindir",
    "postgres_server",
    "replicated_postgres",
]

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


def _options(root: Path, port: int, *extra: str) -> str:
    """The server options of a test cluster: loopback only, its socket in ``root``, fsync on."""
    base = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=on -c max_connections=200"
    return " ".join([base, *extra])


def _pg_ctl(bindir: Path, user: pwd.struct_passwd, datadir: Path, *argv: str) -> None:
    _as_user(user, [str(bindir / "pg_ctl"), "-D", str(datadir), *argv])


def _start(bindir: Path, user: pwd.struct_passwd, datadir: Path, options: str) -> None:
    _pg_ctl(bindir, user, datadir, "-l", str(datadir.parent / f"{datadir.name}.log"), "-o", options, "-w", "start")


@contextlib.contextmanager
def _user_dir(prefix: str) -> Iterator[tuple[Path, pwd.struct_passwd, Path]]:
    """(bindir, the cluster's user, a fresh temporary directory that user owns); the directory goes at exit."""
    bindir = find_bindir()
    user = _ensure_user()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chown(root, user.pw_uid, user.pw_gid)
    try:
        yield bindir, user, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _initdb(bindir: Path, user: pwd.struct_passwd, datadir: Path) -> None:
    _as_user(user, [str(bindir / "initdb"), "-D", str(datadir), "-U", PG_USER, "--auth=trust", "-E", "UTF8"])


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresServer]:
    """Initialise and start a cluster in a fresh temporary directory; stop it and remove the directory at exit."""
    with _user_dir("replika-pg-") as (bindir, user, root):
        datadir, port = root / "data", _free_port()
        _initdb(bindir, user, datadir)
        _start(bindir, user, datadir, _options(root, port))
        try:
            yield PostgresServer("127.0.0.1", port, PG_USER, datadir)
        finally:
            _pg_ctl(bindir, user, datadir, "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole test session, started the first time a test asks for it."""
    with running_cluster() as server:
        yield server


#: The standby's name in ``synchronous_standby_names`` and its ``application_name``.
STANDBY_NAME = "standby1"


@dataclass(frozen=True)
class ReplicatedPair:
    """A primary and a synchronous streaming standby on loopback (see :func:`replicated_postgres`)."""

    primary: PostgresServer
    standby: PostgresServer
    bindir: Path
    user: pwd.struct_passwd

    @property
    def url(self) -> str:
        """The libpq multi-host URL of the ``postgres`` database on whichever of the two is writable."""
        hosts = f"{self.primary.host}:{self.primary.port},{self.standby.host}:{self.standby.port}"
        return f"postgresql://{self.primary.user}@{hosts}/postgres?target_session_attrs=read-write"

    def promote(self) -> None:
        """Make the standby a primary (``pg_ctl promote``), returning once it accepts writes."""
        _pg_ctl(self.bindir, self.user, self.standby.datadir, "-w", "-t", "60", "promote")

    def stop_primary(self) -> None:
        """Stop the primary as a crash would (``pg_ctl stop -m immediate``): no shutdown checkpoint, sessions cut."""
        _pg_ctl(self.bindir, self.user, self.primary.datadir, "-m", "immediate", "-w", "stop")


def _wait_for_sync_standby(primary: PostgresServer) -> None:
    """Until the primary streams to the standby as its synchronous one (bounded)."""
    deadline = time.monotonic() + 60
    with psycopg.connect(primary.url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,)
            ).fetchone()
            if row is not None and row[0] == "sync":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby never became synchronous (pg_stat_replication: {row})")
            time.sleep(0.05)  # another process's state: there is nothing to await but its answer


@contextlib.contextmanager
def replicated_pair() -> Iterator[ReplicatedPair]:
    """A fresh primary and a streaming standby made from it with ``pg_basebackup -R``. The primary confirms a
    commit only once the standby has it (``synchronous_standby_names``, ``synchronous_commit=on``), so whatever
    it confirmed survives losing it. The setting is given on the primary's command line, not in its
    postgresql.conf, so that the standby does not copy it: once promoted, it must commit alone."""
    with _user_dir("replika-pgha-") as (bindir, user, root):
        primary = PostgresServer("127.0.0.1", _free_port(), PG_USER, root / "primary")
        standby = PostgresServer("127.0.0.1", _free_port(), PG_USER, root / "standby")
        _initdb(bindir, user, primary.datadir)
        with open(primary.datadir / "pg_hba.conf", "a") as hba:
            hba.write(f"host replication {PG_USER} 127.0.0.1/32 trust\n")  # a throwaway cluster on loopback
        sync = f"-c wal_level=replica -c max_wal_senders=5 -c synchronous_standby_names={STANDBY_NAME}"
        _start(bindir, user, primary.datadir, _options(root, primary.port, sync, "-c synchronous_commit=on"))
        started = [primary]
        try:
            base = [str(bindir / "pg_basebackup"), "-D", str(standby.datadir), "-R", "-X", "stream", "-c", "fast"]
            _as_user(user, [*base, "-h", primary.host, "-p", str(primary.port), "-U", PG_USER])
            conninfo = f"host={primary.host} port={primary.port} user={PG_USER} application_name={STANDBY_NAME}"
            with open(standby.datadir / "postgresql.auto.conf", "a") as auto:
                auto.write(f"primary_conninfo = '{conninfo}'\n")  # the last setting wins over -R's own
            _start(bindir, user, standby.datadir, _options(root, standby.port, "-c hot_standby=on"))
            started.append(standby)
            _wait_for_sync_standby(primary)
            yield ReplicatedPair(primary, standby, bindir, user)
        finally:
            for server in started:
                with contextlib.suppress(RuntimeError):  # the test may have stopped it already
                    _pg_ctl(bindir, user, server.datadir, "-m", "immediate", "-w", "stop")


@pytest.fixture
def replicated_postgres() -> Iterator[ReplicatedPair]:
    """A primary and its synchronous standby, fresh for each test (a test stops or promotes them)."""
    with replicated_pair() as pair:
        yield pair
