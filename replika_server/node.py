"""The composition root: one broker process's parts, built from its :class:`Config` and started side by side.

:meth:`Node.start` opens the store the ``--store`` option names, puts the broker over it, the request pipeline
over the broker, and then the TCP server and the admin sidecar in front, neither knowing of the other.
:func:`run` is ``replika serve``: start, serve until SIGTERM or SIGINT, shut down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from replika_protocol import Frame
from replika_server import __version__
from replika_server.auth import AuthTable, Principal
from replika_server.broker import Broker
from replika_server.config import Config, ConfigError, check_exposure
from replika_server.connection import Connection
from replika_server.metrics import Histogram
from replika_server.pipeline import Outcome, Pipeline
from replika_server.replies import reply_frame
from replika_server.store import Declare, StoreError, StoreOptions
from replika_server.store import open as open_store
from replika_server.tcp import Connections, TcpServer, tls_context

if TYPE_CHECKING:
    from replika_server.admin import AdminServer

__all__ = ["Node", "Reply", "run"]

log = structlog.get_logger("replika.server")

#: Net container allocations between collections of the youngest generation in ``replika serve`` (Python's
#: default is 700). The broker allocates a record per delivered message and frees it at the ack, a round trip
#: later; at 700 the collector ran every few hundred deliveries and walked the leased records each time, about
#: 7% of the broker's time fetching a backlog. Nothing on the hot paths makes reference cycles.
GC_YOUNG_THRESHOLD = 10_000

#: Gets a request's reply fields (without ``id`` and ``ok``), or the StoreError it failed with.
Reply = Callable[[Frame | StoreError], None]


class Node:
    """A running broker: store, broker, pipeline, TCP server and admin sidecar. Create with :meth:`start`."""

    def __init__(self, config: Config, broker: Broker, pipeline: Pipeline, tcp: TcpServer) -> None:
        self.config = config
        self.broker = broker
        self.pipeline = pipeline
        self.tcp = tcp
        self.started_at = time.time()
        self.admin: AdminServer | None = None
        self._admin_start: asyncio.Task[None] | None = None  # its web stack loading, in the background

    @classmethod
    async def start(cls, config: Config, *, admin_in_background: bool = False) -> Node:
        """Open the store and listen. Raises :class:`ConfigError` for settings that cannot be served (an
        unreadable auth file or certificate, an exposed bind without authentication), StoreInUse for a data
        directory another broker owns.

        The admin sidecar's port is bound before this returns. With ``admin_in_background`` its web stack is
        loaded and served after, while the broker already serves (``replika serve``: a restart is not held up
        by importing FastAPI); otherwise it answers HTTP when this returns."""
        check_exposure(config)
        tls_context(config)  # a certificate that does not load fails the start before the store is opened
        store = await open_store(
            config.store_url,
            StoreOptions(
                durable=config.durability == "sync",
                max_size=config.max_store_size,
                sync_interval=config.sync_interval,
                max_queues=config.max_queues,
                default_max_length=config.queue_max_length or None,
                default_max_bytes=config.queue_max_bytes or None,
            ),
        )
        node: Node | None = None
        try:
            connections = Connections(config)
            broker = Broker(store, connections, max_reply=config.max_frame - 1024)
            pipeline = Pipeline(config, broker)
            node = cls(config, broker, pipeline, TcpServer(config, pipeline, broker, connections))
            await _declare_queues(broker, config)
            await node.tcp.listen()
            if config.admin_port is not None:
                await node._start_admin(admin_in_background)
        except BaseException:
            if node is not None:
                node.tcp.stop_listening()
                if node.admin is not None:
                    await node.admin.stop()
            await store.close()
            raise
        log.info(
            "listening",
            host=config.host,
            port=node.port,
            store=store.engine,
            durability=config.durability,
            tls=config.tls_cert is not None,
            mutual_tls=config.tls_client_ca is not None,
            auth=str(config.auth) if config.auth is not None else None,
        )
        return node

    async def _start_admin(self, in_background: bool) -> None:
        from replika_server.admin import AdminServer  # cheap: the web stack loads in serve()

        self.admin = AdminServer.bind(self.config)
        if in_background:
            self._admin_start = asyncio.get_running_loop().create_task(self._serve_admin(self.admin))
        else:
            await self.admin.serve(self)

    async def _serve_admin(self, admin: AdminServer) -> None:
        try:
            await admin.serve(self, import_in_thread=True)
            gc.freeze()  # the web stack's modules, as the broker's at start
        except Exception:
            # The broker keeps serving queues; the sidecar's port is closed, so its clients are refused.
            log.exception("admin_failed")
            await admin.stop()
            self.admin = None

    # ----------------------------------------------------------------------------------------------- the views
    @property
    def version(self) -> str:
        return str(__version__)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        return self.tcp.port

    @property
    def admin_port(self) -> int | None:
        """The admin sidecar's bound port, None without one."""
        return self.admin.port if self.admin is not None else None

    @property
    def connections(self) -> set[Connection]:
        return self.tcp.connections.open

    @property
    def accepted(self) -> int:
        return self.tcp.connections.accepted

    @property
    def refused(self) -> int:
        return self.tcp.connections.refused

    @property
    def publish_confirm(self) -> Histogram:
        return self.pipeline.publish_confirm

    @property
    def auth(self) -> AuthTable | None:
        return self.pipeline.auth

    def store_bytes(self) -> int:
        """Bytes the store takes on disk."""
        return self.broker.store.size_bytes()

    def authenticate(self, token: object) -> Principal | None:
        return self.pipeline.authenticate(token)

    def admit(self, principal: Principal, op: str, frame: Frame, owner: int) -> Callable[[Reply], None]:
        """The HTTP APIs' way into the pipeline: admit ``frame`` (or raise RequestError) and return the function
        that runs it, whose argument gets the binary protocol's reply fields or the StoreError."""
        admitted = self.pipeline.admit(principal, op, frame, owner)
        store_op = admitted.op

        def run(reply: Reply) -> None:
            def done(result: Outcome) -> None:
                reply(result if isinstance(result, StoreError) else reply_frame(store_op, result))

            admitted.run(done)

        return run

    def reload_auth(self) -> bool:
        """Re-read the ``--auth`` file (SIGHUP). Connections keep going under their token's new permissions;
        those whose token was removed or given a new secret are closed with UNAUTHORIZED. A file that does not
        load leaves everything as it was. True if the new file is in force."""
        table = self.pipeline.reload_auth()
        if table is None:
            return False
        revoked = self.tcp.connections.revoke(table)
        log.info("auth_reloaded", tokens=len(table.principals), revoked_connections=revoked)
        return True

    # ----------------------------------------------------------------------------------------------- stopping
    async def stop(self) -> None:
        """Stop accepting, finish the commit in progress, answer what is queued, close connections."""
        if self._admin_start is not None and not self._admin_start.done():
            self._admin_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._admin_start
        if self.admin is not None:
            await self.admin.stop()
        self.tcp.stop_listening()
        await self.broker.close()
        await self.tcp.close_connections()
        log.info("stopped")


async def _declare_queues(broker: Broker, config: Config) -> None:
    """Declare the config file's queues, in one commit, before the broker listens: no client sees them with
    other options. Raises :class:`ConfigError` naming a queue the store refuses (too many queues, a full store)."""
    if not config.queues:
        return
    loop = asyncio.get_running_loop()
    results: list[asyncio.Future[StoreError | None]] = []
    for q in config.queues:
        results.append(loop.create_future())
        broker.submit(Declare(q.name, q.options), results[-1].set_result)
    for q, result in zip(config.queues, await asyncio.gather(*results), strict=True):
        if isinstance(result, StoreError):
            raise ConfigError(f'queues."{q.name}": the store refused to declare it: {result.code}: {result.message}')
    log.info("queues_declared", queues=[q.name for q in config.queues])


async def run(config: Config, on_ready: Callable[[Node], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. ``on_ready`` runs once listening. If the store
    fails meanwhile, shut down the same way, then raise its ``STORE_FAILED`` :class:`StoreError`."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    node = await Node.start(config, admin_in_background=True)
    gc.freeze()  # what start-up made lives as long as the process: no collection needs to walk it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, node.reload_auth)
    # Only now tell whoever waits for us (a port file): a SIGTERM sent as soon as it appears must stop us cleanly.
    if on_ready is not None:
        on_ready(node)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(node.broker.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    log.info("shutting_down", reason="signal" if stop.is_set() else "store_failed")
    await node.stop()
    failure = node.broker.failure  # read after the drain, which may be where the store failed
    if failure is not None:
        # Answered what was in flight; now exit non-zero, so that a supervisor restarts the broker and LMDB
        # reopens at its last durable commit.
        raise failure
