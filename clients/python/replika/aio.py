"""The asyncio client: one persistent connection, pipelined requests, batched writes."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from replika._aio_connection import AsyncConnection
from replika._core import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CONSUME_POLL,
    DEFAULT_PREFETCH,
    Payload,
    Prefetch,
    as_bytes,
    check,
    check_queue,
    history_query,
    publish_ids,
    publish_options,
    topic_ids,
)
from replika._message import Message, PeekedMessage
from replika.errors import ConnectionLost
from replika_protocol import Frame

__all__ = ["AsyncClient"]


class AsyncClient(AsyncConnection):
    """A connection to a Replika broker for asyncio code.

    Use as ``async with AsyncClient("replika://127.0.0.1:8777") as client:``. Every method may be called
    concurrently: requests are pipelined on the one connection and matched to replies by correlation id.
    If the connection drops, calls in flight raise :class:`~replika.ConnectionLost` and the next call reconnects.
    Durations are float seconds.

    ``token`` authenticates to a broker run with ``--auth``. ``replikas://`` connects over TLS, verifying the
    server's certificate against the system's CAs; pass ``ssl=`` an :class:`ssl.SSLContext` for your own CA or a
    client certificate (mutual TLS). While connected, the client pings a quiet connection so that the broker's
    idle timeout never closes it.

    Settling is fast by default: :meth:`ack`, :meth:`nack`, :meth:`reject` and :meth:`touch` (and the same on a
    :class:`~replika.Message`) return once the settle is queued; the settles of one loop turn leave together, in
    one request where they can, at the end of the turn. Such a settle is durable once the broker has answered it;
    until then a crash may undo it, and an undone ack only means the message is delivered again (at-least-once).
    ``wait=True`` on a settle, or :meth:`flush`, waits until every settle made so far is durable; :meth:`close`
    does so too. The error of a settle not waited for (:class:`~replika.StaleLease`, say) is raised by the next
    call on the client once its reply has come (a settle call first queues its own settle; any other call raises
    before doing anything), else by :meth:`flush` or :meth:`close`; never dropped. ``consume()``'s iteration does
    not raise it, so that the loop's next ack does. SPEC.md §5 "Settles not waited for" has the precise rules.
    """

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
        history: bool | dict[str, Any] | None = None,
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
        seconds a publish's ``dedup_id`` is remembered (0: no deduplication). ``history``: record each message's
        life (see :meth:`history`): True for the defaults, or a dict of ``retention`` (seconds a finished
        message's history is kept, default 7 days), ``max_messages`` (default 100000) and ``payloads`` (keep
        payloads, default False); None or False: off.
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
            history=history,
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

    async def history(self, queue: str, id: int) -> dict[str, Any]:
        """The recorded life of message ``id`` of ``queue`` (declared with ``history``): a dict with ``queue``,
        ``id``, ``state``, ``published_at``, ``headers``, ``payload`` (None unless the queue keeps payloads) and
        ``events``, oldest first, each with ``at`` (unix s), ``kind``, ``attempt``, ``connection`` and the kind's own
        fields (SPEC.md §5 history). :class:`~replika.NotFound` if none is kept."""
        check_queue(queue)
        return dict((await self._call("history", queue=queue, message_id=id))["message"])

    async def history_list(
        self,
        queue: str,
        *,
        max: int = 100,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        header: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Messages of ``queue`` with a recorded history, newest first, as :meth:`history` gives them: at most
        ``max`` (up to 1000), those whose ``state`` is that (``waiting``, ``in_flight``, ``acked``,
        ``dead_lettered``, ...), published within [``since``, ``until``] (unix s) and carrying ``header``
        (name, value)."""
        check_queue(queue)
        reply = await self._call("history", queue=queue, **history_query(max, state, since, until, header))
        return list(reply["messages"])

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
        return await self._fetch(queue, max, wait, lease)

    async def _fetch(self, queue: str, max: int, wait: float, lease: float) -> list[Message]:
        await self._ensure(deferred=False)
        rid, data = self._core.request("fetch", queue=queue, max=min(max, self._core.max_batch), wait=wait, lease=lease)
        reply = check(await self._send(rid, data, queue))
        return [Message(queue, m, self) for m in reply["msgs"]]

    async def _settle(self, op: str, msgs: Message | Iterable[Message], wait: bool, extra: dict[str, Any]) -> None:
        batch = [msgs] if isinstance(msgs, Message) else list(msgs)
        if batch:
            await self._ensure(deferred=False)
            self._core.settle(op, batch, extra)
            self._schedule_flush()
        if wait:
            await self.flush()
        elif self._core.settles.has_errors:
            self._raise_deferred()

    async def ack(self, msgs: Message | Iterable[Message], *, wait: bool = False) -> None:
        """Delete processed messages (one or a list). Returns once queued: durable once the broker answers (see
        the class); ``wait=True``: once durable, as :meth:`flush`. A lease token no longer current fails with
        :class:`~replika.StaleLease` naming its ids (the rest are applied): raised here with ``wait=True``, else
        by a later call."""
        await self._settle("ack", msgs, wait, {})

    async def nack(self, msgs: Message | Iterable[Message], delay: float | None = None, *, wait: bool = False) -> None:
        """Make messages ready again, after ``delay`` seconds if given, else after the queue's retry delay (at
        once unless it was declared with ``retry_delay``). Queued or waited for as :meth:`ack`."""
        await self._settle("nack", msgs, wait, {} if delay is None else {"delay": delay})

    async def reject(self, msgs: Message | Iterable[Message], *, wait: bool = False) -> None:
        """Move messages to their queue's dead-letter queue now. Queued or waited for as :meth:`ack`."""
        await self._settle("reject", msgs, wait, {})

    async def touch(self, msgs: Message | Iterable[Message], lease: float = 30.0, *, wait: bool = False) -> None:
        """Extend leases to ``lease`` seconds from now. Queued or waited for as :meth:`ack`; the broker applies it
        when the request arrives, at the end of this loop turn."""
        await self._settle("touch", msgs, wait, {"lease": lease})

    async def consume(
        self, queue: str, *, prefetch: int = DEFAULT_PREFETCH, lease: float = 30.0
    ) -> AsyncIterator[Message]:
        """Yield messages of ``queue`` for ever, keeping fetches in flight so the next ones are already here.

        Up to ``prefetch`` messages are leased ahead of the caller (their leases run while they wait). On a lost
        connection it reconnects with backoff and goes on; leases of messages not yet acked end with the old
        connection (at-least-once). Messages prefetched but not yet yielded when the loop is left are handed
        back (nack, not counted as an attempt: the application never saw them). The loop to write is::

            async for msg in client.consume("jobs"):
                handle(msg.payload)
                await msg.ack()  # queued, not waited for: acks leave together, with the next fetch
        """
        check_queue(queue)
        window = Prefetch(prefetch, lease)
        buffer: deque[Message] = deque()
        inflight: deque[tuple[int, asyncio.Future[Frame]]] = deque()  # fetches: (messages asked for, reply)
        backoff = BACKOFF_FIRST
        try:
            while True:
                if not window.full(len(buffer)):
                    try:
                        want = window.want(len(buffer), sum(n for n, _ in inflight))
                        if want:
                            inflight.append((want, await self._fetch_now(queue, want, lease)))
                        if not buffer:
                            reply = check(await self._reply(inflight.popleft()[1], queue))
                            buffer.extend(Message(queue, m, self) for m in reply["msgs"])
                            backoff = BACKOFF_FIRST
                            continue
                    except ConnectionLost:
                        if self._closed:
                            raise
                        _drop_fetches(inflight)  # the same connection's: they failed too
                        await asyncio.sleep(backoff * (1 + random.random()))
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        continue
                msg = buffer.popleft()
                taken = time.perf_counter()
                yield msg
                window.handed_out(time.perf_counter() - taken, len(msg.payload))
        finally:
            for _, fetch in inflight:
                if fetch.done() and not fetch.cancelled() and fetch.exception() is None:
                    self._core.hand_back(queue, fetch.result())  # landed but never handed out
                else:
                    fetch.cancel()  # the core hands back whatever it still delivers
            if buffer and self._transport is not None:
                self._core.hand_back_messages(buffer)
            self._schedule_flush()

    async def _fetch_now(self, queue: str, want: int, lease: float) -> asyncio.Future[Frame]:
        """Send a fetch for consume() at once, with the settles queued before it, rather than at the end of the
        loop turn: a caller working through its buffer without awaiting anything would hold it back until the
        buffer is empty, and no fetch would ever be ahead."""
        await self._ensure(deferred=False)
        rid, data = self._core.request(
            "fetch", queue=queue, max=min(want, self._core.max_batch), wait=CONSUME_POLL, lease=lease
        )
        fut = self._submit(rid, data, queue)
        self._flush()
        return fut


def _drop_fetches(inflight: deque[tuple[int, asyncio.Future[Frame]]]) -> None:
    for _, fetch in inflight:
        if fetch.done():
            if not fetch.cancelled():
                fetch.exception()  # retrieved: it is the same ConnectionLost, already handled
        else:
            fetch.cancel()
    inflight.clear()
