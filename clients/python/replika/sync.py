"""The blocking client: the same protocol core as :class:`AsyncClient` over a plain socket."""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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
from replika._message import PeekedMessage, SyncMessage
from replika._sync_connection import SyncConnection
from replika.errors import ConnectionLost, ReplikaError

__all__ = ["Client"]


class Client(SyncConnection):
    """A blocking connection to a Replika broker, with the same methods as :class:`AsyncClient`.

    Use as ``with Client("replika://127.0.0.1:8777") as client:``. One client is not safe to share between
    threads; give each thread its own. Multi-request calls (``publish_many``, ``ack`` of many) are pipelined.
    Durations are float seconds. ``token``, ``replikas://`` and ``ssl=`` work as for :class:`AsyncClient`. A
    blocking client cannot ping while the caller is busy elsewhere: when its connection has been quiet for
    longer than the broker's idle timeout allows, the next call opens a new one first. The old connection's leases
    end with it (the broker would have closed it anyway): a message held longer than about 0.9 x the broker's
    ``idle_timeout`` (270 s by default) without a call, ``touch`` included, may be delivered again and its ack
    fail with :class:`~replika.StaleLease`.

    Settling is fast by default, with :class:`AsyncClient`'s rules, except when requests leave. Outside a
    :meth:`consume` loop, :meth:`ack`, :meth:`nack`, :meth:`reject` and :meth:`touch` write their request before
    they return and do not wait for the reply. Inside one (while the caller holds a message it handed out), an
    ack, nack or reject is held back and written with the others held (one request per run of one op and queue):
    with the next request the client writes anyway (the loop's next fetch, any other call, a touch), before the
    client blocks on the network, once ``SETTLE_BATCH`` (512) are held, at a settle call or loop step that starts
    ``SETTLE_DELAY`` (0.02 s) or more after the oldest was made, at a loop step when the caller's last message
    took it long enough that the next step would come later than that, and when the loop is left. So a held
    settle is written at the latest by the first call on the client that starts 0.02 s after it, which in the
    loop is within 0.02 s plus the caller's time over one message. Replies are read whenever the client reads
    anyway; a call first reads those already in without blocking (a settle call at most once a millisecond); more
    than ``SETTLE_WINDOW`` (1,024) unanswered settle requests make a settle call read until 1,024 or fewer are.
    ``wait=True``, :meth:`flush` and :meth:`close` write what is held and wait until every settle so far is
    durable. An error of a settle not waited for is raised by the next call once its reply has been read, else by
    :meth:`flush` or :meth:`close`. SPEC.md §5 "Settles not waited for" has the precise rules.
    """

    # ----------------------------------------------------------------------------------------------- queues
    def ping(self) -> None:
        """Round trip to the broker."""
        self._call("ping")

    def declare(
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
        """Create ``queue`` or change its options (idempotent). See :meth:`AsyncClient.declare`."""
        check_queue(queue)
        self._call(
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

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and every message in it."""
        check_queue(queue)
        self._call("delete_queue", queue=queue)

    def purge(self, queue: str) -> int:
        """Delete every message of ``queue`` that is not leased; return how many."""
        check_queue(queue)
        return int(self._call("purge", queue=queue)["purged"])

    def queues(self) -> list[dict[str, Any]]:
        """Every queue with its counts."""
        return list(self._call("queues")["queues"])

    def stats(self, queue: str) -> dict[str, Any]:
        """Counts of ``queue``: ``ready``, ``in_flight``, ``delayed``, ``total``, and its options."""
        check_queue(queue)
        return dict(self._call("stats", queue=queue)["stats"])

    def peek(self, queue: str, *, max: int = 1) -> list[PeekedMessage]:
        """Read up to ``max`` ready messages without leasing them. See :meth:`AsyncClient.peek`."""
        check_queue(queue)
        reply = self._call("peek", queue=queue, max=min(max, self._core.max_batch))
        return [PeekedMessage(queue, m) for m in reply["msgs"]]

    def history(self, queue: str, id: int) -> dict[str, Any]:
        """The recorded life of message ``id`` of ``queue``. See :meth:`AsyncClient.history`."""
        check_queue(queue)
        return dict((self._call("history", queue=queue, message_id=id))["message"])

    def history_list(
        self,
        queue: str,
        *,
        max: int = 100,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        header: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Messages of ``queue`` with a recorded history. See :meth:`AsyncClient.history_list`."""
        check_queue(queue)
        reply = self._call("history", queue=queue, **history_query(max, state, since, until, header))
        return list(reply["messages"])

    def redrive(self, dead_letter_queue: str, *, to: str | None = None, max: int | None = None) -> int:
        """Move dead-lettered messages back; how many moved. See :meth:`AsyncClient.redrive`."""
        check_queue(dead_letter_queue)
        if to is not None:
            check_queue(to)
        if max is None:
            # What is there now, not what keeps arriving: a consumer that dead-letters redriven messages at once
            # must not keep this loop going for ever.
            max = int((self.stats(dead_letter_queue))["total"])
        moved = 0
        while moved < max:
            want = min(max - moved, self._core.max_batch)
            reply = self._call("redrive", queue=dead_letter_queue, to=to, max=want)
            moved += int(reply["moved"])
            if int(reply["moved"]) < want:
                break
        return moved

    # ----------------------------------------------------------------------------------------------- messages
    def publish(
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
        """Store one message durably; return its id. Options as :meth:`AsyncClient.publish`."""
        return self.publish_many(
            queue,
            [payload],
            headers=None if headers is None else [headers],
            priority=priority,
            delay=delay,
            ttl=ttl,
            dedup_ids=None if dedup_id is None else [dedup_id],
        )[0]

    def publish_many(
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
        """Store many messages; return their ids in order. Options as :meth:`AsyncClient.publish_many`."""
        items = [as_bytes(p, self._core.max_payload) for p in payloads]
        if headers is not None and len(headers) != len(items):
            raise ValueError("headers needs one entry per payload")
        extra, dedup = publish_options(priority, delay, ttl, dedup_ids, len(items))
        if not items:
            return []
        self._ensure()
        hdrs = list(headers) if headers is not None else None
        chunks = list(self._core.publish_chunks(queue, items, hdrs, dedup, **extra))
        ids: list[int] = []
        for reply in self._pipeline(chunks):
            ids.extend(publish_ids(reply))
        return ids

    def publish_topic(
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
        """One copy per bound queue; queue -> id. See :meth:`AsyncClient.publish_topic`."""
        check_queue(topic)
        extra, dedup = publish_options(priority, delay, ttl, None if dedup_id is None else [dedup_id], 1)
        self._ensure()
        item = [as_bytes(payload, self._core.max_payload)]
        hdrs: list[dict[str, str] | None] | None = None if headers is None else [headers]
        chunks = list(self._core.publish_chunks(topic, item, hdrs, dedup, op="publish_topic", **extra))
        return {queue: ids[0] for queue, ids in topic_ids(self._pipeline(chunks)).items()}

    def bind(self, queue: str, pattern: str) -> None:
        """Route topics matching ``pattern`` to ``queue``. See :meth:`AsyncClient.bind`."""
        check_queue(queue)
        self._call("bind", queue=queue, pattern=pattern)

    def unbind(self, queue: str, pattern: str) -> None:
        """Remove a binding (no-op if there is none)."""
        check_queue(queue)
        self._call("unbind", queue=queue, pattern=pattern)

    def fetch(self, queue: str, *, max: int = 1, wait: float = 0.0, lease: float = 30.0) -> list[SyncMessage]:
        """Lease up to ``max`` ready messages, waiting up to ``wait`` seconds for the first."""
        check_queue(queue)
        self._ensure()
        rid = self._start_fetch(queue, max, wait, lease)
        return self._finish_fetch(rid, queue, wait)

    def _start_fetch(self, queue: str, max: int, wait: float, lease: float) -> int:
        rid, data = self._core.request("fetch", queue=queue, max=min(max, self._core.max_batch), wait=wait, lease=lease)
        self._core.send(rid, data, rid, fetch_queue=queue)
        self._flush()
        return rid

    def _finish_fetch(self, rid: int, queue: str, wait: float) -> list[SyncMessage]:
        timeout = None if self._timeout is None else self._timeout + wait
        reply = check(self._wait(rid, timeout))
        return [SyncMessage(queue, m, self) for m in reply["msgs"]]

    def _settle(self, op: str, msgs: SyncMessage | Iterable[SyncMessage], wait: bool, extra: dict[str, Any]) -> None:
        batch = [msgs] if isinstance(msgs, SyncMessage) else list(msgs)
        if batch:
            self._ensure(deferred=False)
            now = self._clock()
            self._core.settle(op, batch, extra, now)
            if self._looping and op != "touch":
                self._send_due(now)
            else:
                # Outside a consume() loop nothing says the caller will call again soon; a touch is of use only
                # if it reaches the broker while the caller works.
                self._flush()
            self._read_settles(now)
        if wait:
            self.flush()
        elif self._core.settles.has_errors:
            self._raise_deferred()

    def ack(self, msgs: SyncMessage | Iterable[SyncMessage], *, wait: bool = False) -> None:
        """Delete processed messages (one or a list). The request is written before this returns, or, inside a
        :meth:`consume` loop, held back and written with others, at the latest by the first call on the client
        0.02 s (``SETTLE_DELAY``) after this one (see the class); its reply is read later: durable once the broker
        answers; ``wait=True``: written now and waited for until durable, as :meth:`flush`. A lease token no
        longer current fails with :class:`~replika.StaleLease` naming its ids (the rest are applied): raised here
        with ``wait=True``, else by a later call."""
        self._settle("ack", msgs, wait, {})

    def nack(
        self, msgs: SyncMessage | Iterable[SyncMessage], delay: float | None = None, *, wait: bool = False
    ) -> None:
        """Make messages ready again, after ``delay`` seconds if given, else after the queue's retry delay. Sent
        (or held back in a :meth:`consume` loop), or waited for, as :meth:`ack`."""
        self._settle("nack", msgs, wait, {} if delay is None else {"delay": delay})

    def reject(self, msgs: SyncMessage | Iterable[SyncMessage], *, wait: bool = False) -> None:
        """Move messages to their queue's dead-letter queue now. Sent (or held back in a :meth:`consume` loop), or
        waited for, as :meth:`ack`."""
        self._settle("reject", msgs, wait, {})

    def touch(self, msgs: SyncMessage | Iterable[SyncMessage], lease: float = 30.0, *, wait: bool = False) -> None:
        """Extend leases to ``lease`` seconds from now. Never held back, even in a :meth:`consume` loop: written
        before this returns (with the settles held before it), so that it reaches the broker while the caller
        works; its reply is read later, or waited for with ``wait=True``, as :meth:`ack`."""
        self._settle("touch", msgs, wait, {"lease": lease})

    def consume(self, queue: str, *, prefetch: int = DEFAULT_PREFETCH, lease: float = 30.0) -> Iterator[SyncMessage]:
        """Yield messages of ``queue`` for ever. Fetches are sent ahead, before the messages buffered run out,
        so they are usually answered by the time they are needed. Reconnects with backoff on a lost connection.
        Messages fetched but not yet yielded when the loop is left are handed back, not counted as attempts.
        The loop to write is ``for msg in client.consume("jobs"): handle(msg.payload); msg.ack()``: the acks of
        a fast loop leave together with the next fetch (or after 0.02 s), those of a loop that spends 0.02 s or
        more per message before the next message is handed out; their replies are read with the fetches'."""
        check_queue(queue)
        window = Prefetch(prefetch, lease)
        buffer: deque[SyncMessage] = deque()
        pending: deque[tuple[int, int]] = deque()  # fetches in flight: (messages asked for, request id)
        backoff = BACKOFF_FIRST
        held = 0.0  # seconds the caller took over the message it had last
        try:
            while True:
                try:
                    # The caller's last message took it ``held`` s: if the next is as slow, waiting for the next
                    # call would keep the settles held back past SETTLE_DELAY, so they leave now.
                    self._send_due(self._clock(), held)
                    if not window.full(len(buffer)):
                        self._ensure(deferred=False)
                        want = window.want(len(buffer), sum(n for n, _ in pending))
                        if want:
                            pending.append((want, self._start_fetch(queue, want, CONSUME_POLL, lease)))
                        if not buffer:
                            buffer.extend(self._finish_fetch(pending.popleft()[1], queue, CONSUME_POLL))
                            backoff = BACKOFF_FIRST
                            continue
                except ConnectionLost:
                    pending.clear()
                    buffer.clear()  # their leases ended with the connection
                    time.sleep(backoff * (1 + random.random()))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                msg = buffer.popleft()
                taken = self._clock()
                self._looping += 1
                try:
                    yield msg
                finally:
                    self._looping -= 1
                held = self._clock() - taken
                window.handed_out(held, len(msg.payload))
        finally:
            self._leave_consume(queue, buffer, pending)

    def _leave_consume(self, queue: str, buffer: deque[SyncMessage], pending: deque[tuple[int, int]]) -> None:
        """Hand back what consume() fetched and never yielded; don't block for fetches still out (long polls):
        their messages go back whenever their replies turn up."""
        for _, rid in pending:
            landed = self._replies.pop(rid, None)
            if landed is None:
                self._core.abandon(rid)
            elif landed.get("msgs"):
                buffer.extend(SyncMessage(queue, m, self) for m in landed["msgs"])
        if self._sock is None:
            return
        if buffer:
            self._core.hand_back_messages(buffer)
        with contextlib.suppress(ReplikaError):  # else their leases end with the connection or expire
            self._flush()  # the settles the loop held back go too: nothing says when the next call comes
