"""The asyncio client: one persistent connection, pipelined requests, batched writes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from replika._core import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CONSUME_POLL,
    DEFAULT_URL,
    ClientProtocol,
    Payload,
    as_bytes,
    check,
    check_queue,
    parse_url,
    publish_ids,
    publish_options,
    settle_failures,
    tls_context,
    topic_ids,
)
from replika._message import Message, PeekedMessage
from replika.errors import ConnectionLost, ReplikaError
from replika_protocol import Frame

__all__ = ["AsyncClient"]


class _Protocol(asyncio.Protocol):
    """Hands a connection's events to its client once :meth:`adopt` is called; what happens before (the
    server may refuse a connection the moment it is made) is kept and replayed then."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._adopted = False
        self._early: list[bytes] = []
        self._lost_early: tuple[Exception | None] | None = None

    def adopt(self) -> None:
        self._adopted = True
        early, self._early = self._early, []
        for data in early:
            self._client._on_data(data)
        if self._lost_early is not None:
            self._client._on_lost(self._lost_early[0])

    def data_received(self, data: bytes) -> None:
        if self._adopted:
            self._client._on_data(data)
        else:
            self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._adopted:
            self._lost_early = (exc,)
        elif self._client._protocol is self:  # a connection closed by close() may report in after a new one
            self._client._on_lost(exc)

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class AsyncClient:
    """A connection to a Replika broker for asyncio code.

    Use as ``async with AsyncClient("replika://127.0.0.1:8777") as client:``. Every method may be called
    concurrently: requests are pipelined on the one connection and matched to replies by correlation id.
    If the connection drops, calls in flight raise :class:`~replika.ConnectionLost` and the next call reconnects.
    Durations are float seconds.

    ``token`` authenticates to a broker run with ``--auth``. ``replikas://`` connects over TLS, verifying the
    server's certificate against the system's CAs; pass ``ssl=`` an :class:`ssl.SSLContext` for your own CA or a
    client certificate (mutual TLS). While connected, the client pings a quiet connection so that the broker's
    idle timeout never closes it.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        ssl: _ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        client_name: str = "replika-py",
    ) -> None:
        self._endpoint = parse_url(url)
        self._ssl = tls_context(self._endpoint, ssl)
        self._core: ClientProtocol[asyncio.Future[Frame]] = ClientProtocol(client_name, token, self._endpoint, _waiting)
        self._connect_timeout = connect_timeout
        self._keepalive: asyncio.TimerHandle | None = None
        self._protocol: _Protocol | None = None
        self._last_write = 0.0
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while the connection is open and the handshake is done."""
        return self._transport is not None

    @property
    def max_batch(self) -> int:
        """The server's limit on messages per request (known after connecting)."""
        return self._core.max_batch

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------------- connection
    async def connect(self) -> None:
        """Open the connection and do the handshake (done for you by ``async with`` and on first use)."""
        async with self._connect_lock:
            if self._transport is not None:
                return
            self._closed = False
            loop = asyncio.get_running_loop()
            ep = self._endpoint
            try:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _Protocol(self),
                        ep.host,
                        ep.port,
                        ssl=self._ssl,
                        server_hostname=ep.host if self._ssl is not None else None,
                    ),
                    self._connect_timeout,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                raise ConnectionLost(f"cannot connect to {ep.host}:{ep.port}: {exc}") from None
            self._core.connection_made()
            self._transport = transport
            self._protocol = protocol
            hello: asyncio.Future[Frame] = loop.create_future()
            self._core.send(*self._core.hello(), hello)
            self._schedule_flush()
            protocol.adopt()
            try:
                reply = await asyncio.wait_for(hello, self._connect_timeout)
                self._core.on_hello(reply)
            except BaseException:
                self._abort()
                raise
            self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        interval = self._core.keepalive_interval
        if interval is not None and self._transport is not None:
            self._keepalive = asyncio.get_running_loop().call_later(interval, self._on_keepalive, interval)

    def _on_keepalive(self, interval: float) -> None:
        self._keepalive = None
        if self._transport is None:
            return
        if asyncio.get_running_loop().time() - self._last_write >= interval * 0.9:
            rid, data = self._core.request("ping")
            self._core.send(rid, data, None)  # its reply needs no one
            self._schedule_flush()
        self._arm_keepalive()

    async def close(self) -> None:
        """Close the connection. Unacked messages it leased become ready again at the broker."""
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._transport is not None:
            self._flush()
            self._transport.close()
            self._transport = None
        self._fail_pending(ConnectionLost("the client was closed"))

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def _on_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._writable.set()
        reason = f": {exc}" if exc else ""
        self._fail_pending(ConnectionLost(f"connection to the broker lost{reason}"))

    def _fail_pending(self, error: ReplikaError) -> None:
        for fut in self._core.connection_lost():
            if not fut.done():
                fut.set_exception(error)

    def _on_data(self, data: bytes) -> None:
        core = self._core
        for fut, frame in core.receive_data(data):
            fut.set_result(frame)
        if core.failure is not None:
            self._fail_pending(core.failure)
            self._abort()
        elif core.has_data_to_send:  # fetches nobody waits for any more are handed back
            self._schedule_flush()

    # ----------------------------------------------------------------------------------------------- requests
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Coalesce every request made in this loop turn into one write (one syscall).
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self._transport.is_closing():
            data = self._core.data_to_send()
            if data:
                self._transport.write(data)
                self._last_write = asyncio.get_running_loop().time()

    async def _send(self, rid: int, data: bytes, fetch_queue: str | None) -> Frame:
        if self._transport is None:
            raise ConnectionLost("not connected")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._core.send(rid, data, fut, fetch_queue)
        self._schedule_flush()
        try:
            if not self._writable.is_set():
                await self._writable.wait()
            return await fut
        except asyncio.CancelledError:
            # Its reply is dropped when it comes, a fetch's messages handed back rather than left holding leases.
            fut.cancel()
            if fetch_queue is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                self._core.hand_back(fetch_queue, fut.result())  # it landed before the cancellation reached us
                self._schedule_flush()
            raise

    async def _send_all(self, requests: list[tuple[int, bytes]]) -> list[Frame]:
        """Pipeline ``requests`` and await every reply. One request is awaited directly: gather() would wrap it
        in a task and cost it an extra loop turn of latency."""
        if len(requests) == 1:
            rid, data = requests[0]
            return [await self._send(rid, data, None)]
        return list(await asyncio.gather(*(self._send(rid, data, None) for rid, data in requests)))

    async def _ensure(self) -> None:
        if self._transport is None:
            await self.connect()

    async def _call(self, op: str, **fields: Any) -> Frame:
        await self._ensure()
        rid, data = self._core.request(op, **fields)
        return check(await self._send(rid, data, None))

    # ----------------------------------------------------------------------------------------------- queues
    async def ping(self) -> None:
        """Round trip to the broker."""
        await self._call("ping")

    async def declare(
        self,
        queue: str,
        *,
        max_attempts: int | None = None,
        dead_letter: str | None = None,
        max_length: int | None = None,
        max_bytes: int | None = None,
        overflow: str | None = None,
        retry_delay: float | None = None,
        retry_backoff: float | None = None,
        retry_max_delay: float | None = None,
        message_ttl: float | None = None,
        expired: str | None = None,
        dedup_window: float | None = None,
    ) -> None:
        """Create ``queue`` or change its options (idempotent: options are replaced as a whole, so an option left
        out goes back to its default). Durations are float seconds.

        ``max_attempts``: deliveries after which a nacked or expired message goes to the dead-letter queue
        (None: unlimited). ``dead_letter``: that queue's name (None: ``<queue>.dlq``). ``max_length`` (messages)
        and ``max_bytes`` (payload and header bytes) bound the queue (None: the broker's
        ``--queue-max-length``/``--queue-max-bytes``, unlimited unless set); ``overflow`` says what a publish past
        them does: ``"reject"`` (default: :class:`~replika.QueueFull`), ``"drop_oldest"`` (the oldest ready
        messages are deleted to make room) or ``"dead_letter"`` (they are moved to the dead-letter queue).

        ``retry_delay``, ``retry_backoff`` (default 2.0) and ``retry_max_delay`` (default 30 days): a nack without
        a delay, or a lease that expires or whose connection closes, makes the message ready again after
        ``min(retry_delay * retry_backoff ** (attempts - 1), retry_max_delay)`` (no retry_delay: at once).
        ``message_ttl``: seconds a message may live from its publish; an expired one is never delivered, it is
        dead-lettered (reason ``expired``) or, with ``expired="drop"``, deleted. ``dedup_window`` (default 120):
        seconds a publish's ``dedup_id`` is remembered (0: no deduplication).
        """
        check_queue(queue)
        await self._call(
            "declare",
            queue=queue,
            max_attempts=max_attempts,
            dead_letter=dead_letter,
            max_length=max_length,
            max_bytes=max_bytes,
            overflow=overflow,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            retry_max_delay=retry_max_delay,
            message_ttl=message_ttl,
            expired=expired,
            dedup_window=dedup_window,
        )

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and every message in it. Later acks of its messages fail with NOT_FOUND."""
        check_queue(queue)
        await self._call("delete_queue", queue=queue)

    async def purge(self, queue: str) -> int:
        """Delete every message of ``queue`` that is not leased; return how many."""
        check_queue(queue)
        return int((await self._call("purge", queue=queue))["purged"])

    async def queues(self) -> list[dict[str, Any]]:
        """Every queue with its counts (see :meth:`stats`)."""
        return list((await self._call("queues"))["queues"])

    async def stats(self, queue: str) -> dict[str, Any]:
        """Counts of ``queue``: ``ready``, ``in_flight``, ``delayed``, ``total``, and its options."""
        check_queue(queue)
        return dict((await self._call("stats", queue=queue))["stats"])

    async def peek(self, queue: str, *, max: int = 1) -> list[PeekedMessage]:
        """Read up to ``max`` ready messages of ``queue`` in delivery order without leasing them (nothing
        changes; attempts are not counted). Lowered to the server's batch limit and its reply size."""
        check_queue(queue)
        reply = await self._call("peek", queue=queue, max=min(max, self._core.max_batch))
        return [PeekedMessage(queue, m) for m in reply["msgs"]]

    async def redrive(self, dead_letter_queue: str, *, to: str | None = None, max: int | None = None) -> int:
        """Move ready messages of ``dead_letter_queue`` back: to ``to`` if given, else each to the queue named by
        its ``replika-dead-letter-queue`` header (messages without one stay). Each becomes a new message there,
        with its payload and its headers less the ``replika-dead-letter-*`` ones. Moves at most ``max`` (None: all
        there are, in requests of the server's batch limit); returns how many moved."""
        check_queue(dead_letter_queue)
        if to is not None:
            check_queue(to)
        if max is None:
            # What is there now, not what keeps arriving: a consumer that dead-letters redriven messages at once
            # must not keep this loop going for ever.
            max = int((await self.stats(dead_letter_queue))["total"])
        moved = 0
        while moved < max:
            want = min(max - moved, self._core.max_batch)
            reply = await self._call("redrive", queue=dead_letter_queue, to=to, max=want)
            moved += int(reply["moved"])
            if int(reply["moved"]) < want:
                break
        return moved

    # ----------------------------------------------------------------------------------------------- messages
    async def publish(
        self,
        queue: str,
        payload: Payload,
        *,
        headers: dict[str, str] | None = None,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
    ) -> int:
        """Store one message durably; return its id once the broker confirms the commit.

        ``priority`` 0-9 (default 0): higher priorities are fetched first, FIFO within one. ``delay``: seconds
        before it can be fetched. ``ttl``: seconds after which it expires unfetched (see :meth:`declare`).
        ``dedup_id``: a repeat of an id the queue saw within its ``dedup_window`` stores nothing and returns the
        first message's id.
        """
        ids = await self.publish_many(
            queue,
            [payload],
            headers=None if headers is None else [headers],
            priority=priority,
            delay=delay,
            ttl=ttl,
            dedup_ids=None if dedup_id is None else [dedup_id],
        )
        return ids[0]

    async def publish_many(
        self,
        queue: str,
        payloads: Sequence[Payload],
        *,
        headers: Sequence[dict[str, str] | None] | None = None,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_ids: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Store many messages; return their ids in order. Split into requests as the server's limits need,
        all pipelined. ``priority``, ``delay`` and ``ttl`` apply to every message (see :meth:`publish`);
        ``dedup_ids`` has one entry (str or None) per payload."""
        items = [as_bytes(p, self._core.max_payload) for p in payloads]
        if headers is not None and len(headers) != len(items):
            raise ValueError("headers needs one entry per payload")
        extra, dedup = publish_options(priority, delay, ttl, dedup_ids, len(items))
        if not items:
            return []
        await self._ensure()
        hdrs = list(headers) if headers is not None else None
        chunks = list(self._core.publish_chunks(queue, items, hdrs, dedup, **extra))
        replies = await self._send_all(chunks)
        ids: list[int] = []
        for reply in replies:
            ids.extend(publish_ids(reply))
        return ids

    async def publish_topic(
        self,
        topic: str,
        payload: Payload,
        *,
        headers: dict[str, str] | None = None,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        dedup_id: str | None = None,
    ) -> dict[str, int]:
        """Store one copy of a message in every queue bound (:meth:`bind`) by a pattern matching ``topic``, in one
        commit, all or nothing; return each queue's new message id (empty when no binding matches). The options
        are :meth:`publish`'s; a ``dedup_id`` is checked per queue."""
        check_queue(topic)
        extra, dedup = publish_options(priority, delay, ttl, None if dedup_id is None else [dedup_id], 1)
        await self._ensure()
        item = [as_bytes(payload, self._core.max_payload)]
        hdrs: list[dict[str, str] | None] | None = None if headers is None else [headers]
        chunks = list(self._core.publish_chunks(topic, item, hdrs, dedup, op="publish_topic", **extra))
        return {queue: ids[0] for queue, ids in topic_ids(await self._send_all(chunks)).items()}

    async def bind(self, queue: str, pattern: str) -> None:
        """Route topics matching ``pattern`` to ``queue`` (created if absent): ``*`` matches one dot-separated
        word, ``#`` zero or more. Durable; binding twice is a no-op."""
        check_queue(queue)
        await self._call("bind", queue=queue, pattern=pattern)

    async def unbind(self, queue: str, pattern: str) -> None:
        """Remove a binding made by :meth:`bind` (no-op if there is none)."""
        check_queue(queue)
        await self._call("unbind", queue=queue, pattern=pattern)

    async def fetch(self, queue: str, *, max: int = 1, wait: float = 0.0, lease: float = 30.0) -> list[Message]:
        """Lease up to ``max`` ready messages (lowered to the server's batch limit), waiting up to ``wait``
        seconds for the first; each lease lasts ``lease`` seconds unless acked, nacked or touched."""
        check_queue(queue)
        await self._ensure()
        rid, data = self._core.request("fetch", queue=queue, max=min(max, self._core.max_batch), wait=wait, lease=lease)
        reply = check(await self._send(rid, data, queue))
        return [Message(queue, m, self) for m in reply["msgs"]]

    async def _settle(self, op: str, msgs: Message | Iterable[Message], **extra: Any) -> None:
        batch = [msgs] if isinstance(msgs, Message) else list(msgs)
        if not batch:
            return
        await self._ensure()
        chunks = list(self._core.settle_chunks(op, batch, **extra))
        replies = await self._send_all(chunks)
        settle_failures(replies)

    async def ack(self, msgs: Message | Iterable[Message]) -> None:
        """Delete processed messages. Raises :class:`~replika.StaleLease` (after applying the rest) for any
        whose lease token is no longer current."""
        await self._settle("ack", msgs)

    async def nack(self, msgs: Message | Iterable[Message], delay: float | None = None) -> None:
        """Make messages ready again, after ``delay`` seconds if given, else after the queue's retry delay (at
        once unless it was declared with ``retry_delay``)."""
        if delay is None:
            await self._settle("nack", msgs)
        else:
            await self._settle("nack", msgs, delay=delay)

    async def reject(self, msgs: Message | Iterable[Message]) -> None:
        """Move messages to their queue's dead-letter queue now."""
        await self._settle("reject", msgs)

    async def touch(self, msgs: Message | Iterable[Message], lease: float = 30.0) -> None:
        """Extend leases to ``lease`` seconds from now."""
        await self._settle("touch", msgs, lease=lease)

    async def consume(self, queue: str, *, prefetch: int = 100, lease: float = 30.0) -> AsyncIterator[Message]:
        """Yield messages of ``queue`` for ever, keeping a fetch in flight so the next ones are already here.

        Up to ``prefetch`` messages are leased ahead of the caller. On a lost connection it reconnects with
        backoff and goes on; leases of messages not yet acked end with the old connection (at-least-once).
        Messages prefetched but not yet yielded when the loop is left are handed back (nack, not counted as an
        attempt: the application never saw them).
        """
        check_queue(queue)
        prefetch = max(1, prefetch)
        buffer: deque[Message] = deque()
        inflight: asyncio.Task[list[Message]] | None = None
        backoff = BACKOFF_FIRST
        try:
            while True:
                if inflight is None and len(buffer) <= prefetch // 2:
                    inflight = asyncio.ensure_future(
                        self.fetch(queue, max=prefetch - len(buffer), wait=CONSUME_POLL, lease=lease)
                    )
                if not buffer:
                    assert inflight is not None
                    try:
                        got = await inflight
                        backoff = BACKOFF_FIRST
                    except ConnectionLost:
                        if self._closed:
                            raise
                        await asyncio.sleep(backoff * (1 + random.random()))
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        got = []
                    finally:
                        inflight = None
                    buffer.extend(got)
                    continue
                yield buffer.popleft()
        finally:
            if inflight is not None:
                if inflight.done() and not inflight.cancelled() and inflight.exception() is None:
                    buffer.extend(inflight.result())  # landed but never handed out: give it back below
                else:
                    inflight.cancel()  # the client hands back whatever it still delivers
            if buffer and self._transport is not None:
                rest = list(buffer)
                buffer.clear()
                with contextlib.suppress(ReplikaError):  # else their leases end with the connection or expire
                    await self._settle("nack", rest, delay=0.0, unseen=True)


def _waiting(fut: asyncio.Future[Frame]) -> bool:
    """Whether the caller still waits for this reply (a cancelled call's future is done)."""
    return not fut.done()
