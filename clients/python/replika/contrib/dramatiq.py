"""A Dramatiq broker for Replika::

    import dramatiq
    from replika.contrib.dramatiq import ReplikaBroker

    dramatiq.set_broker(ReplikaBroker("replika://127.0.0.1:8777"))

What it does differently from Dramatiq's Redis and RabbitMQ brokers:

- Delays are Replika's own: ``send_with_options(delay=...)`` and the Retries middleware's backoff publish with a
  server-side delay, so there are no ``.DQ`` queues and no delayed message waits in a worker's memory.
- A delivery is a lease kept alive with ``touch`` while the worker holds the message: a long task is never handed
  to another worker while it runs, and a worker that dies (kill -9 included) gives its messages back at once,
  when its connection closes.
- ``nack`` (a message that failed for good) is Replika's ``reject``: the message moves to ``<queue>.dlq`` with
  ``replika-dead-letter-*`` headers, and ``dramatiq-retries`` and ``dramatiq-retry-history`` (one line per retry:
  the last line of the traceback that caused it) say what happened before.
- ``requeue`` (unprocessed messages at shutdown) makes them ready again at once; ``join`` waits until the queue
  holds nothing (ready, leased or delayed).

The message's ``broker_priority`` option (0-9, higher first) is its Replika priority.
"""

from __future__ import annotations

import logging
import queue as _queue
import ssl as _ssl
import time
import uuid
from typing import Any

import dramatiq
from dramatiq.errors import ConnectionClosed, DecodeError, QueueJoinTimeout

from replika import ConnectionLost, ReplikaError
from replika import Message as ReplikaMessage
from replika.contrib._bridge import Bridge
from replika.contrib._holder import DEFAULT_LEASE, Budget, feed

__all__ = ["ReplikaBroker"]

log = logging.getLogger("replika.contrib.dramatiq")

#: Replika's longest delay, milliseconds (30 days).
MAX_DELAY_MS = 2_592_000_000
#: Seconds enqueue keeps retrying a publish lost with the connection (the broker restarting, say).
ENQUEUE_RETRY_FOR = 30.0
HISTORY_KEY = "replika_retry_history"
HISTORY_LINES = 20
HISTORY_LINE = 200


class ReplikaBroker(dramatiq.Broker):
    """Dramatiq's broker on a Replika server.

    ``url``, ``token`` and ``ssl`` are the SDK's (``replikas://`` for TLS). ``lease``: seconds each delivery is
    leased for, renewed while the worker holds it. ``queue_options``: ``{queue: {declare options}}`` applied when
    the queue is declared (e.g. ``{"default": {"max_attempts": 10}}``; see :meth:`replika.AsyncClient.declare`);
    queues without an entry are left as they are. ``middleware`` is Dramatiq's.
    """

    def __init__(
        self,
        url: str = "replika://127.0.0.1:8777",
        *,
        token: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        middleware: list[dramatiq.Middleware] | None = None,
        lease: float = DEFAULT_LEASE,
        queue_options: dict[str, dict[str, Any]] | None = None,
        client_name: str = "replika-dramatiq",
    ) -> None:
        super().__init__(middleware=middleware)
        self.url = url
        self.lease = lease
        self.queues: dict[str, None] = {}
        self.queue_options = dict(queue_options or {})
        self._connect = {"token": token, "ssl": ssl, "lease": lease, "client_name": client_name, "logger": log}
        self._publisher = self._bridge()

    def _bridge(self) -> Bridge:
        return Bridge(self.url, **self._connect)  # type: ignore[arg-type]

    @property
    def consumer_class(self) -> type[_Consumer]:
        return _Consumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> dramatiq.Consumer:
        """A consumer of ``queue_name`` holding at most ``prefetch`` messages, whose ``next()`` waits up to
        ``timeout`` milliseconds."""
        return self.consumer_class(self, queue_name, prefetch, timeout)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        options = self.queue_options.get(queue_name)
        if options:
            self._publisher.call(lambda c: c.declare(queue_name, **options))
        self.queues[queue_name] = None
        self.emit_after("declare_queue", queue_name)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Publish ``message``, after ``delay`` milliseconds (server-side) if given."""
        if delay is not None and not 0 <= delay <= MAX_DELAY_MS:
            raise ValueError(f"delay must be 0 to {MAX_DELAY_MS} ms (30 days), not {delay}")
        message = _with_history(message)
        retries = int(message.options.get("retries") or 0)
        headers = {
            "dramatiq-actor": message.actor_name,
            "dramatiq-message-id": message.message_id,
            "dramatiq-retries": str(retries),
        }
        history = message.options.get(HISTORY_KEY)
        if history:
            headers["dramatiq-retry-history"] = "\n".join(history)
        priority = _priority(message.options.get("broker_priority"))
        self.emit_before("enqueue", message, delay)
        self._publish(message.queue_name, message.encode(), headers, (delay or 0) / 1000, priority)
        self.emit_after("enqueue", message, delay)
        return message

    def _publish(self, queue: str, payload: bytes, headers: dict[str, str], delay: float, priority: int) -> None:
        # One dedup id for every try of this enqueue: a publish whose confirm was lost with the connection is
        # stored once, however often it is sent again.
        dedup = uuid.uuid4().hex
        deadline = time.monotonic() + ENQUEUE_RETRY_FOR
        backoff = 0.05
        while True:
            try:
                self._publisher.call(
                    lambda c: c.publish(
                        queue, payload, headers=headers, delay=delay or None, priority=priority or None, dedup_id=dedup
                    )
                )
                return
            except ConnectionLost as exc:
                if time.monotonic() + backoff > deadline:
                    raise ConnectionClosed(exc) from None
                time.sleep(backoff)  # the broker is away: wait before reconnecting
                backoff = min(backoff * 2, 2.0)

    def flush(self, queue_name: str) -> None:
        """Delete every message of ``queue_name`` that no worker holds."""
        self._publisher.call(lambda c: c.purge(queue_name))

    def flush_all(self) -> None:
        for name in self.queues:
            self.flush(name)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        """Wait until ``queue_name`` holds no message at all, ready, leased or delayed (for tests). Checks every
        ``interval`` ms; :class:`~dramatiq.errors.QueueJoinTimeout` after ``timeout`` ms."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            stats = self._publisher.call(lambda c: c.stats(queue_name))
            if int(stats["total"]) == 0:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(interval / 1000)  # the broker has no "wait until empty": ask again

    def close(self) -> None:
        self._publisher.close()


class _Proxy(dramatiq.MessageProxy):
    def __init__(self, message: dramatiq.Message[Any], delivery: ReplikaMessage) -> None:
        super().__init__(message)
        self._delivery = delivery


class _Consumer(dramatiq.Consumer):
    """Leases up to ``prefetch`` messages of one queue on a connection of its own (so that closing it gives back
    exactly its messages) and hands them to the consumer thread."""

    def __init__(self, broker: ReplikaBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.queue_name = queue_name
        self.timeout = timeout / 1000
        self._bridge = broker._bridge()
        self._ready: _queue.SimpleQueue[ReplikaMessage] = _queue.SimpleQueue()
        try:
            self._budget, self._task = self._bridge.call(lambda _c: self._start(max(1, prefetch)))
        except ReplikaError as exc:
            raise ConnectionClosed(exc) from None

    async def _start(self, prefetch: int) -> tuple[Budget, Any]:
        import asyncio

        budget = Budget(prefetch)

        def deliver(msgs: list[ReplikaMessage]) -> None:
            for msg in msgs:
                self._ready.put(msg)

        task = asyncio.get_running_loop().create_task(
            feed(self._bridge.holder, self.queue_name, budget, deliver, logger=log)
        )
        return budget, task

    def __next__(self) -> dramatiq.MessageProxy | None:
        try:
            delivery = self._ready.get(timeout=self.timeout)
        except _queue.Empty:
            return None
        try:
            return _Proxy(dramatiq.Message.decode(delivery.payload), delivery)
        except DecodeError:
            log.exception("replika: message %s of %s does not decode: dead-lettered", delivery.id, self.queue_name)
            self._bridge.settle("reject", [delivery], self._budget)
            return None

    def ack(self, message: dramatiq.MessageProxy) -> None:
        self._bridge.settle("ack", [_delivery(message)], self._budget)

    def nack(self, message: dramatiq.MessageProxy) -> None:
        self._bridge.settle("reject", [_delivery(message)], self._budget)

    def requeue(self, messages: Any) -> None:
        batch = [_delivery(m) for m in messages]
        self._bridge.settle("requeue", batch, self._budget)

    def close(self) -> None:
        self._bridge.soon(self._task.cancel)
        rest = []
        while True:
            try:
                rest.append(self._ready.get_nowait())
            except _queue.Empty:
                break
        self._bridge.settle("requeue", rest, self._budget)
        self._bridge.close()


def _delivery(message: dramatiq.MessageProxy) -> ReplikaMessage:
    delivery: ReplikaMessage = message._delivery
    return delivery


def _priority(value: Any) -> int:
    try:
        return min(9, max(0, int(value)))
    except (TypeError, ValueError):
        return 0


def _with_history(message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
    """The message with a line for its latest retry added to its history, when the Retries middleware has just
    recorded one (``retries`` and ``traceback`` set, and the history one line short)."""
    retries = int(message.options.get("retries") or 0)
    trace = message.options.get("traceback")
    history = list(message.options.get(HISTORY_KEY) or [])
    if retries <= 0 or not trace or len(history) >= retries:
        return message
    lines = [line.strip() for line in str(trace).splitlines() if line.strip()]
    line = f"retry {retries}: {lines[-1] if lines else 'retried'}"
    history.append(line if len(line) <= HISTORY_LINE else line[: HISTORY_LINE - 3] + "...")
    return message.copy(options={HISTORY_KEY: history[-HISTORY_LINES:]})
