"""The blocking client: the same protocol core as :class:`AsyncClient` over a plain socket."""

from __future__ import annotations

import random
import socket
import ssl as _ssl
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
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
from replika._message import PeekedMessage, SyncMessage
from replika.errors import ConnectionLost, ReplikaError
from replika_protocol import Frame

__all__ = ["Client"]

_RECV = 256 * 1024


class Client:
    """A blocking connection to a Replika broker, with the same methods as :class:`AsyncClient`.

    Use as ``with Client("replika://127.0.0.1:8777") as client:``. One client is not safe to share between
    threads; give each thread its own. Multi-request calls (``publish_many``, ``ack`` of many) are pipelined.
    Durations are float seconds. ``token``, ``replikas://`` and ``ssl=`` work as for :class:`AsyncClient`. A
    blocking client cannot ping while the caller is busy elsewhere: when its connection has been quiet for
    longer than the broker's idle timeout allows, the next call opens a new one first. The old connection's leases
    end with it (the broker would have closed it anyway): a message held longer than about 0.9 x the broker's
    ``idle_timeout`` (270 s by default) without a call, ``touch`` included, may be delivered again and its ack
    fail with :class:`~replika.StaleLease`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        ssl: _ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = 60.0,
        client_name: str = "replika-py-sync",
    ) -> None:
        self._endpoint = parse_url(url)
        self._ssl = tls_context(self._endpoint, ssl)
        self._last_io = 0.0
        # Waiters are request ids: a reply is kept in _replies until the call that sent the request reads it.
        self._core: ClientProtocol[int] = ClientProtocol(client_name, token, self._endpoint)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        self._replies: dict[int, Frame] = {}

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    # ----------------------------------------------------------------------------------------------- connection
    def connect(self) -> None:
        """Open the connection and do the handshake (done by ``with`` and on first use)."""
        if self._sock is not None:
            return
        ep = self._endpoint
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=self._connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {ep.host}:{ep.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=ep.host)
            except OSError as exc:  # ssl.SSLError included
                sock.close()
                raise ConnectionLost(f"TLS handshake with {ep.host}:{ep.port} failed: {exc}") from None
        self._sock = sock
        self._sock_timeout = self._connect_timeout
        self._core.connection_made()
        self._replies.clear()
        rid, data = self._core.hello()
        self._core.send(rid, data, rid)
        try:
            self._flush()
            self._core.on_hello(self._wait(rid, self._connect_timeout))
        except BaseException:
            self._drop()
            raise

    def close(self) -> None:
        """Close the connection. Unacked messages it leased become ready again at the broker."""
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._core.connection_lost()  # nobody waits in a blocking client once its call has raised

    def _flush(self) -> None:
        """Send every request the core has queued."""
        data = self._core.data_to_send()
        if not data:
            return
        assert self._sock is not None
        try:
            self._set_timeout(self._timeout)
            self._sock.sendall(data)
            self._last_io = time.monotonic()
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"connection to the broker lost: {exc}") from None

    def _set_timeout(self, timeout: float | None) -> None:
        # settimeout is a syscall (it flips O_NONBLOCK): only make it when the value changes.
        if timeout != self._sock_timeout and self._sock is not None:
            self._sock.settimeout(timeout)
            self._sock_timeout = timeout

    def _wait(self, rid: int, timeout: float | None = None) -> Frame:
        """Read until the reply to ``rid`` arrives, keeping other replies for their callers."""
        while rid not in self._replies:
            self._receive(timeout if timeout is not None else self._timeout)
        return self._replies.pop(rid)

    def _receive(self, timeout: float | None) -> None:
        """One read from the socket, its replies routed by the core; raise if the connection failed."""
        sock = self._sock
        if sock is None:
            raise ConnectionLost("not connected")
        try:
            self._set_timeout(timeout)
            data = sock.recv(_RECV)
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"connection to the broker lost: {exc}") from None
        if not data:
            self._drop()
            raise ConnectionLost("the broker closed the connection")
        self._last_io = time.monotonic()  # a reply (say, of a long poll) restarts the broker's idle clock too
        core = self._core
        for rid, frame in core.receive_data(data):
            self._replies[rid] = frame
        if core.failure is not None:
            failure = core.failure
            self._drop()
            raise failure
        self._flush()  # fetches nobody waits for any more are handed back

    def _ensure(self) -> None:
        interval = self._core.keepalive_interval
        if self._sock is not None and interval is not None and time.monotonic() - self._last_io > 2.7 * interval:
            self._drop()  # the broker may have closed it as idle by now: start afresh rather than fail
        if self._sock is None:
            self.connect()

    def _call(self, op: str, **fields: Any) -> Frame:
        self._ensure()
        rid, data = self._core.request(op, **fields)
        return check(self._pipeline([(rid, data)])[0])

    def _pipeline(self, requests: list[tuple[int, bytes]]) -> list[Frame]:
        for rid, data in requests:
            self._core.send(rid, data, rid)
        self._flush()
        return [self._wait(rid) for rid, _ in requests]

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

    def _settle(self, op: str, msgs: SyncMessage | Iterable[SyncMessage], **extra: Any) -> None:
        batch = [msgs] if isinstance(msgs, SyncMessage) else list(msgs)
        if not batch:
            return
        self._ensure()
        settle_failures(self._pipeline(list(self._core.settle_chunks(op, batch, **extra))))

    def ack(self, msgs: SyncMessage | Iterable[SyncMessage]) -> None:
        """Delete processed messages; :class:`~replika.StaleLease` for tokens no longer current."""
        self._settle("ack", msgs)

    def nack(self, msgs: SyncMessage | Iterable[SyncMessage], delay: float | None = None) -> None:
        """Make messages ready again, after ``delay`` seconds if given, else after the queue's retry delay."""
        if delay is None:
            self._settle("nack", msgs)
        else:
            self._settle("nack", msgs, delay=delay)

    def reject(self, msgs: SyncMessage | Iterable[SyncMessage]) -> None:
        """Move messages to their queue's dead-letter queue now."""
        self._settle("reject", msgs)

    def touch(self, msgs: SyncMessage | Iterable[SyncMessage], lease: float = 30.0) -> None:
        """Extend leases to ``lease`` seconds from now."""
        self._settle("touch", msgs, lease=lease)

    def consume(self, queue: str, *, prefetch: int = 100, lease: float = 30.0) -> Iterator[SyncMessage]:
        """Yield messages of ``queue`` for ever. The next fetch is sent before the current batch is handed
        out, so it is usually answered by the time it is needed. Reconnects with backoff on a lost connection.
        Messages fetched but not yet yielded when the loop is left are handed back, not counted as attempts."""
        check_queue(queue)
        prefetch = max(1, prefetch)
        buffer: deque[SyncMessage] = deque()
        pending: int | None = None
        backoff = BACKOFF_FIRST
        try:
            while True:
                try:
                    self._ensure()
                    if pending is None and len(buffer) <= prefetch // 2:
                        pending = self._start_fetch(queue, prefetch - len(buffer), CONSUME_POLL, lease)
                    if not buffer:
                        assert pending is not None
                        rid, pending = pending, None
                        buffer.extend(self._finish_fetch(rid, queue, CONSUME_POLL))
                        backoff = BACKOFF_FIRST
                        continue
                except ConnectionLost:
                    pending = None
                    buffer.clear()  # their leases ended with the connection
                    time.sleep(backoff * (1 + random.random()))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                yield buffer.popleft()
        finally:
            if pending is not None:
                landed = self._replies.pop(pending, None)
                if landed is None:
                    # Don't block for the long poll: hand its messages back whenever its reply turns up.
                    self._core.abandon(pending)
                elif landed.get("msgs"):
                    buffer.extend(SyncMessage(queue, m, self) for m in landed["msgs"])
            if self._sock is not None:
                try:
                    if buffer:
                        self._settle("nack", list(buffer), delay=0.0, unseen=True)
                except ReplikaError:
                    pass  # their leases end with the connection or expire
