"""The broker's TCP front end: the listener, its connections, and what the broker asks of them.

:class:`Connections` is the registry of open connections; it is what the broker sees of its front end
(:class:`~replika_server.broker.FrontEnds`): how much reply room a lease owner has, and the signal that a batch's
replies are all handed out. :class:`TcpServer` listens (plain or TLS) and closes connections at shutdown.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import time

import structlog

from replika_server import __version__
from replika_server.auth import AuthTable
from replika_server.broker import Broker
from replika_server.config import Config, ConfigError
from replika_server.connection import Connection
from replika_server.outbox import Outbox
from replika_server.pipeline import Pipeline

__all__ = ["Connections", "TcpServer", "tls_context"]

log = structlog.get_logger("replika.server")

#: Seconds a graceful shutdown waits for replies to drain before closing connections anyway.
SHUTDOWN_GRACE = 5.0


class Connections:
    """The open connections, by lease owner; refusals past ``max_connections`` are counted here."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.open: set[Connection] = set()
        self.by_owner: dict[int, Connection] = {}
        self.dirty: list[Outbox] = []  # outboxes with replies from the batch being handed out
        self.refused = 0  # connections refused at max_connections
        self.accepted = 0  # connections accepted (past the limit check)
        self._refusal_logged = -1e9

    def register(self, conn: Connection) -> bool:
        """Count ``conn`` in, or False when the broker is at ``max_connections`` (it is then refused)."""
        if len(self.open) >= self._config.max_connections:
            self._refuse()
            return False
        self.accepted += 1
        self.open.add(conn)
        self.by_owner[conn.owner] = conn
        return True

    def unregister(self, conn: Connection) -> bool:
        """Forget ``conn``; False if it was never counted (refused)."""
        if conn not in self.open:
            return False
        self.open.discard(conn)
        del self.by_owner[conn.owner]
        return True

    def _refuse(self) -> None:
        """Count a connection refused at ``max_connections``; log the first of each burst, not every one."""
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= 10.0:
            self._refusal_logged = now
            log.warning("connections_refused", limit=self._config.max_connections, refused_total=self.refused)

    # ----------------------------------------------------------------------------------------------- FrontEnds
    def batch_handed_out(self) -> None:
        dirty = self.dirty.copy()
        self.dirty.clear()  # in place: every outbox holds this very list
        for outbox in dirty:
            try:
                outbox.flush()
            except Exception:  # a transport failing must not keep the other connections' replies back
                outbox.reset()
                log.exception("reply_write_failed")

    def reply_room(self, owner: int) -> int:
        conn = self.by_owner.get(owner)
        # No connection: an HTTP fetch (its reply is bounded by the frame limit alone), or a closed
        # connection's, whose leases its Release ends anyway.
        return conn.reply_room() if conn is not None else 2**62

    def revoke(self, table: AuthTable) -> int:
        """After an auth reload: connections keep going under their token's new permissions; those whose token
        was removed or given a new secret are closed with UNAUTHORIZED. How many were closed."""
        revoked = 0
        for conn in list(self.open):
            if conn.principal is None:
                continue
            successor = table.successor(conn.principal)
            if successor is None:
                revoked += 1
                conn.revoke(f"token {conn.principal.name!r} was revoked")
            else:
                conn.principal = successor
        return revoked


class TcpServer:
    """Listens for clients of the binary (and text) protocol and hands each a :class:`Connection`."""

    def __init__(self, config: Config, pipeline: Pipeline, broker: Broker, connections: Connections) -> None:
        self.config = config
        self.pipeline = pipeline
        self.broker = broker
        self.connections = connections
        self.dirty = connections.dirty
        self.started_at = time.time()
        self._listener: asyncio.Server | None = None

    def register(self, conn: Connection) -> bool:
        return self.connections.register(conn)

    def unregister(self, conn: Connection) -> bool:
        return self.connections.unregister(conn)

    def info(self) -> dict[str, object]:
        """What the text protocol's STATS (without a queue) says of the broker."""
        return {
            "version": __version__,
            "uptime": f"{time.time() - self.started_at:.1f}",
            "connections": len(self.connections.open),
            "durability": self.config.durability,
        }

    async def listen(self) -> None:
        """Bind and accept. Raises :class:`ConfigError` for a certificate that does not load, OSError for an
        address that cannot be bound."""
        config = self.config
        tls = tls_context(config)
        _raise_fd_limit(config.max_connections)
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: Connection(self),
            config.host,
            config.port,
            reuse_address=True,
            backlog=1024,
            ssl=tls,
            ssl_handshake_timeout=config.handshake_timeout if tls is not None else None,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()

    async def close_connections(self) -> None:
        """Ask each connection to finish (send what it has, then close); abort those still open after the grace."""
        conns = list(self.connections.open)
        for conn in conns:
            conn.close()
        if conns:
            # Transports close once their write buffers drain; a client that stopped reading gets aborted.
            await asyncio.wait([c.lost for c in conns], timeout=SHUTDOWN_GRACE)
        for conn in list(self.connections.open):
            conn.abort()


def tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            ctx.load_verify_locations(config.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate, key or client CA: {exc}") from None
    return ctx


def _raise_fd_limit(max_connections: int) -> None:
    """Make room for ``max_connections`` sockets (plus the store's and the process's own files)."""
    want = max_connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want or soft == resource.RLIM_INFINITY:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < want:
        log.warning("file_limit_low", max_connections=max_connections, open_files_limit=new)
