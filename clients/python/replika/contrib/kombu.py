"""A kombu transport for Replika: Celery (or any kombu program) with ``broker_url = "replika://host:8777"``.

Importing this module registers the ``replika://`` and ``replikas://`` (TLS) schemes with kombu::

    import replika.contrib.kombu  # noqa: F401  (registers replika://)
    from celery import Celery

    app = Celery("proj", broker="replika://127.0.0.1:8777")

A token comes from the URL (``replika://:TOKEN@host:8777``, or ``replika://TOKEN@host:8777``) or from the
transport option ``token``; ``replikas://`` verifies the server against the system's CAs, and Celery's
``broker_use_ssl`` (an :class:`ssl.SSLContext`, or a dict of ``ca_certs``, ``certfile``, ``keyfile``,
``cert_reqs``) gives your own CA or a client certificate.

Transport options (Celery: ``broker_transport_options``): ``lease`` (seconds, default 30: the lease of a
delivery, renewed with ``touch`` while the worker holds the message, so it never needs tuning to the longest task
or ETA), ``token``, ``queue_options`` (``{queue: {declare options}}``, e.g. ``{"celery": {"max_attempts": 5}}``;
see :meth:`replika.AsyncClient.declare`) and ``client_name``. There is no ``visibility_timeout`` and no
``polling_interval``: fetches long-poll.

What maps to what is in :mod:`replika.contrib._kombu_channel` (methods), :mod:`replika.contrib._kombu_codec`
(messages) and :mod:`replika.contrib._names` (queue names, exchanges and bindings as topics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl as _ssl
import threading
from collections import deque
from typing import Any

from kombu import exceptions as kombu_errors
from kombu.transport import TRANSPORT_ALIASES, base

import replika
from replika import ConnectionLost, ReplikaError
from replika import Message as ReplikaMessage
from replika.contrib import _kombu_codec as codec
from replika.contrib._bridge import CALL_TIMEOUT, Bridge
from replika.contrib._holder import DEFAULT_LEASE, SETTLE_LINGER, Budget, Settle
from replika.contrib._kombu_channel import Channel as ReplikaChannel
from replika.contrib._kombu_channel import Consumer

__all__ = ["Link", "SSLTransport", "Transport", "register"]

log = logging.getLogger("replika.contrib.kombu")
DEFAULT_PORT = 8777
#: Seconds a closed connection stays open for the messages its consumers still hold (a Celery warm shutdown
#: waits for the tasks running in its pool); past it they go back to the queue.
CLOSE_GRACE = 300.0


class Inbox:
    """Fetched messages on their way from the bridge's loop to the thread that drains the connection. A pipe
    becomes readable when there is something to take, for an event loop (Celery's hub) to watch."""

    def __init__(self) -> None:
        self._items: deque[tuple[Consumer, ReplikaMessage]] = deque()
        self._cond = threading.Condition()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._signalled = False

    def fileno(self) -> int:
        return self._read_fd

    def put(self, items: list[tuple[Consumer, ReplikaMessage]]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()
            if not self._signalled:
                self._signalled = True
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._write_fd, b"!")

    def put_back(self, items: list[tuple[Consumer, ReplikaMessage]]) -> None:
        with self._cond:
            self._items.extendleft(reversed(items))
            self._cond.notify_all()

    def take(self, timeout: float | None) -> list[tuple[Consumer, ReplikaMessage]]:
        """Everything there is, waiting up to ``timeout`` seconds (None: for ever; 0: not at all) for some."""
        with self._cond:
            if not self._items and timeout != 0:
                self._cond.wait_for(lambda: bool(self._items), timeout)
            items = list(self._items)
            self._items.clear()
            if self._signalled:
                self._signalled = False
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._read_fd, 4096):
                        pass
            return items

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Link:
    """What :meth:`Transport.establish_connection` returns: one Replika connection (a :class:`Bridge`), the
    inbox of its consumers, and the exchange types its channels declared."""

    def __init__(self, bridge: Bridge, options: dict[str, Any]) -> None:
        self.bridge = bridge
        self.options = options
        self.inbox = Inbox()
        self.exchange_types: dict[str, str] = {}
        self.channels: set[ReplikaChannel] = set()
        self.closed = False
        self._hub: Any = None
        self._settles: list[tuple[Settle, ReplikaMessage, Budget | None]] = []
        self._linger_armed = False
        #: Messages handed to consumers and not settled yet (any channel, closed ones too).
        self.outstanding = 0
        self._closing = False
        self._finished = False
        self._lock = threading.Lock()
        self._grace: threading.Timer | None = None

    def queue_options(self, queue: str, arguments: dict[str, Any] | None) -> dict[str, Any] | None:
        """The ``declare`` options for ``queue``: its RabbitMQ-style arguments, then the transport option
        ``queue_options`` on top. None when it has none (the queue is then never re-declared)."""
        args = arguments or {}
        opts: dict[str, Any] = {}
        if args.get("x-message-ttl") is not None:
            opts.update(message_ttl=float(args["x-message-ttl"]) / 1000, expired="drop")  # as RabbitMQ, no DLX
        overflow = "reject" if args.get("x-overflow") == "reject-publish" else "drop_oldest"
        if args.get("x-max-length") is not None:
            opts.update(max_length=int(args["x-max-length"]), overflow=overflow)
        if args.get("x-max-length-bytes") is not None:
            opts.update(max_bytes=int(args["x-max-length-bytes"]), overflow=overflow)
        opts.update((self.options.get("queue_options") or {}).get(queue) or {})
        return opts or None

    def deliver(self, timeout: float | None) -> int:
        """Hand the fetched messages to their consumers; how many there were."""
        items = self.inbox.take(timeout)
        for i, (consumer, msg) in enumerate(items):
            try:
                consumer.channel.dispatch(consumer, msg)
            except BaseException:
                self.inbox.put_back(items[i + 1 :])
                raise
        return len(items)

    def on_readable(self) -> None:
        self.deliver(0)

    def settle(self, op: Settle, msg: ReplikaMessage, budget: Budget | None, *, delivered: bool = False) -> None:
        """Settle one delivery. On Celery's event loop settles are handed to the bridge in batches: half the
        prefetch at a time, or SETTLE_LINGER seconds after the first. Each hand-over wakes the bridge's thread,
        and its next fetch waits for room (see Budget) anyway.
        ``delivered``: it was counted in :attr:`outstanding`."""
        if self._hub is None or self._closing:
            self.bridge.settle(op, [msg], budget)
        else:
            self._settles.append((op, msg, budget))
            limit = budget.limit if budget is not None else 0
            if len(self._settles) >= max(1, limit // 2):
                self.flush_settles()
            elif not self._linger_armed:
                self._linger_armed = True
                self._hub.call_later(SETTLE_LINGER, self._on_linger)
        if delivered:
            with self._lock:
                self.outstanding -= 1
                last = self._closing and self.outstanding <= 0
            if last:
                self._finish_close()

    def _on_linger(self) -> None:
        self._linger_armed = False
        self.flush_settles()

    def flush_settles(self) -> None:
        settles, self._settles = self._settles, []
        groups: dict[tuple[Settle, int], tuple[list[ReplikaMessage], Budget | None]] = {}
        for op, msg, budget in settles:
            groups.setdefault((op, id(budget)), ([], budget))[0].append(msg)
        for (op, _), (msgs, budget) in groups.items():
            self.bridge.settle(op, msgs, budget)

    async def redelay(self, msg: ReplikaMessage, consumer: Consumer) -> None:
        """A message whose ETA is beyond one Replika delay came due early: publish it again for the rest of its
        wait and settle this delivery (on the bridge's loop)."""
        holder = self.bridge.holder
        try:
            delay = min(codec.remaining_delay(msg), codec.MAX_DELAY)
            priority = codec.priority_of(msg)
            await holder.client.publish(msg.queue, msg.payload, headers=msg.headers, delay=delay, priority=priority)
        except ReplikaError as exc:
            log.warning("replika: could not re-delay message %s of %s (retried later): %s", msg.id, msg.queue, exc)
            if not consumer.no_ack:
                holder.settle("requeue", [msg])
        else:
            if not consumer.no_ack:
                holder.settle("ack", [msg])
        if not consumer.no_ack:
            consumer.budget.release(1)

    def register(self, hub: Any) -> None:
        self._hub = hub
        hub.add_reader(self.inbox.fileno(), self.on_readable)

    def unregister(self) -> None:
        self.flush_settles()
        if self._hub is not None:
            with contextlib.suppress(Exception):
                self._hub.remove_reader(self.inbox.fileno())
            self._hub = None

    def close(self) -> None:
        """Stop consuming and close the connection; while messages handed to consumers are not settled, the
        connection stays open (their leases renewed) so that they can still be, for at most CLOSE_GRACE
        seconds."""
        if self.closed:
            return
        self.closed = True
        for channel in list(self.channels):
            channel.close()
        self.flush_settles()
        self.unregister()
        # Whatever is still on its way to a consumer goes back before the connection closes.
        for consumer, msg in self.inbox.take(0):
            if not consumer.no_ack:
                self.bridge.settle("requeue", [msg], consumer.budget)
        with self._lock:
            self._closing = True
            wait = self.outstanding > 0
        if wait:
            self._grace = threading.Timer(CLOSE_GRACE, self._finish_close)
            self._grace.daemon = True
            self._grace.start()
        else:
            self._finish_close()

    def _finish_close(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self._grace is not None:
            self._grace.cancel()
        self.bridge.close()
        self.inbox.close()


class Transport(base.Transport):
    """kombu's transport class for ``replika://`` URLs (see the module's docstring)."""

    Channel = ReplikaChannel
    default_port = DEFAULT_PORT  # type: ignore[assignment]
    driver_type = "replika"
    driver_name = "replika-py"
    #: ``replikas://``: TLS with the system's CAs unless an SSL context or options are given.
    tls = False
    connection_errors = (kombu_errors.ConnectionError, ConnectionLost)  # type: ignore[assignment]
    channel_errors = (kombu_errors.ChannelError, ReplikaError)  # type: ignore[assignment]
    recoverable_connection_errors = (ConnectionLost,)
    recoverable_channel_errors = ()
    implements = base.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset({"direct", "topic", "fanout"}),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.options: dict[str, Any] = dict(client.transport_options or {})

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "127.0.0.1"}

    def driver_version(self) -> str:
        return replika.__version__

    def establish_connection(self) -> Link:
        conninfo: Any = self.client
        host = conninfo.hostname or "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        ctx = _ssl_context(conninfo.ssl)
        scheme = "replikas" if self.tls else "replika"
        url = f"{scheme}://{host}:{conninfo.port or self.default_port}"
        if conninfo.virtual_host not in (None, "", "/"):
            log.warning("replika: the virtual host %r is ignored (Replika has none)", conninfo.virtual_host)
        bridge = Bridge(
            url,
            token=self.options.get("token") or conninfo.password or conninfo.userid or None,
            ssl=ctx,
            lease=float(self.options.get("lease", DEFAULT_LEASE)),
            client_name=str(self.options.get("client_name", "replika-kombu")),
            logger=log,
            timeout=float(self.options.get("call_timeout", CALL_TIMEOUT)),
        )
        bridge.connect()
        return Link(bridge, self.options)

    def close_connection(self, connection: Link) -> None:
        connection.close()

    def create_channel(self, connection: Link) -> ReplikaChannel:
        channel = ReplikaChannel(self, connection)
        connection.channels.add(channel)
        return channel

    def close_channel(self, channel: ReplikaChannel) -> None:
        channel.link.channels.discard(channel)
        # kombu tells a closed channel by its connection: a retry then declares on a new one.
        channel.connection = None  # type: ignore[assignment]

    def drain_events(self, connection: Link, timeout: float | None = None, **_: Any) -> None:
        if connection.deliver(timeout) == 0:
            raise TimeoutError("timed out")

    def register_with_event_loop(self, connection: Link, loop: Any) -> None:
        connection.register(loop)

    def unregister_from_event_loop(self, connection: Link, loop: Any) -> None:
        connection.unregister()

    def verify_connection(self, connection: Link) -> bool:
        return not connection.closed


class SSLTransport(Transport):
    """``replikas://``: :class:`Transport` over TLS."""

    tls = True


def _ssl_context(option: Any) -> _ssl.SSLContext | None:
    """kombu's ``ssl`` connection option (Celery's ``broker_use_ssl``) as a context, or None for the SDK's
    default (TLS with the system's CAs for ``replikas://``, plain TCP for ``replika://``)."""
    if isinstance(option, _ssl.SSLContext):
        return option
    if isinstance(option, dict):
        ctx = _ssl.create_default_context(cafile=option.get("ca_certs"))
        if option.get("certfile"):
            ctx.load_cert_chain(option["certfile"], option.get("keyfile"))
        if option.get("cert_reqs") == _ssl.CERT_NONE:
            ctx.check_hostname = False
            ctx.verify_mode = _ssl.CERT_NONE
        return ctx
    if option is True:
        return _ssl.create_default_context()
    return None


def register() -> None:
    """Make kombu (and so Celery) resolve ``replika://`` and ``replikas://`` to this transport. Done on import."""
    TRANSPORT_ALIASES.setdefault("replika", "replika.contrib.kombu:Transport")
    TRANSPORT_ALIASES.setdefault("replikas", "replika.contrib.kombu:SSLTransport")


register()
