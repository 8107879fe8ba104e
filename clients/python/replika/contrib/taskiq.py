"""A taskiq broker for Replika::

    from replika.contrib.taskiq import ReplikaBroker

    broker = ReplikaBroker("replika://127.0.0.1:8777", queue="taskiq")

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

Run workers with ``taskiq worker module:broker``. ``kick`` publishes (confirmed once durable); ``listen`` leases
messages and yields them ackable, so taskiq acks each one when it is done (by default once its result is saved).
The ``delay`` label (seconds) is a server-side delay and the ``priority`` label (0-9, higher first) the message's
Replika priority; taskiq's retry middlewares re-send with ``delay``, so their backoff is server-side too.

While a worker holds a message its lease is renewed with ``touch``; a worker that dies (kill -9 included) gives
its messages back at once. A task that fails and is not sent again (no retry middleware, or its retries are
used up) is moved to ``<queue>.dlq`` instead of being acked (``dead_letter=False`` acks it, as taskiq's other
brokers do); ``taskiq-retries`` and ``taskiq-retry-history`` (one line per retry: the exception that caused it)
travel with every retry into that queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl as _ssl
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Self

from taskiq import AckableMessage, AsyncBroker, BrokerMessage, TaskiqMessage, TaskiqMiddleware, TaskiqResult

from replika import AsyncClient, ConnectionLost
from replika import Message as ReplikaMessage
from replika.contrib._holder import DEFAULT_LEASE, Budget, Holder, Settle, feed

__all__ = ["ReplikaBroker"]

log = logging.getLogger("replika.contrib.taskiq")

#: Replika's longest delay, seconds (30 days).
MAX_DELAY = 2_592_000.0
#: Seconds kick keeps retrying a publish lost with the connection (the broker restarting, say).
KICK_RETRY_FOR = 30.0
HISTORY_LINES = 20
HISTORY_LINE = 200


class ReplikaBroker(AsyncBroker):
    """taskiq's broker on a Replika server, consuming ``queue``.

    ``url``, ``token`` and ``ssl`` are the SDK's (``replikas://`` for TLS). ``lease``: seconds each delivery is
    leased for, renewed while the worker holds it. ``prefetch``: messages a worker process leases ahead.
    ``dead_letter``: a task that fails for good goes to ``<queue>.dlq`` (else it is acked).
    """

    def __init__(
        self,
        url: str = "replika://127.0.0.1:8777",
        *,
        queue: str = "taskiq",
        token: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        lease: float = DEFAULT_LEASE,
        prefetch: int = 10,
        dead_letter: bool = True,
        client_name: str = "replika-taskiq",
    ) -> None:
        super().__init__()
        self.url = url
        self.queue = queue
        self.lease = lease
        self.prefetch = max(1, prefetch)
        self.dead_letter = dead_letter
        self._token = token
        self._ssl = ssl
        self._client_name = client_name
        self._holder: Holder | None = None
        self._pid = -1
        # task id -> the delivery being processed, the failure it ended with, whether it was sent again.
        self._processing: dict[str, ReplikaMessage] = {}
        self._failed: dict[str, str] = {}
        self._sent_again: set[str] = set()
        self._outcomes = _Outcomes(self)
        self.add_middlewares(self._outcomes)

    def add_middlewares(self, *middlewares: TaskiqMiddleware) -> None:
        super().add_middlewares(*middlewares)
        self._outcomes_last()

    def with_middlewares(self, *middlewares: TaskiqMiddleware) -> Self:
        super().with_middlewares(*middlewares)
        self._outcomes_last()
        return self

    def _outcomes_last(self) -> None:
        # taskiq calls on_error last-added first: the failure must be seen before a retry middleware re-sends.
        if self._outcomes in self.middlewares:
            self.middlewares.remove(self._outcomes)
        self.middlewares.append(self._outcomes)

    def _session(self) -> Holder:
        if self._holder is None or self._pid != os.getpid():
            client = AsyncClient(self.url, self._token, ssl=self._ssl, client_name=self._client_name)
            self._holder = Holder(client, lease=self.lease, logger=log)
            self._holder.start()
            self._pid = os.getpid()
        return self._holder

    async def startup(self) -> None:
        """Connect (retried like a kick while the broker is away, so a worker started during a broker restart
        waits for it rather than failing)."""
        self._outcomes_last()
        await super().startup()
        client = self._session().client
        await _retrying(client.connect)

    async def shutdown(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None and self._pid == os.getpid():
            holder.stop()
            await holder.drain()
            await holder.client.close()
        await super().shutdown()

    async def kick(self, message: BrokerMessage) -> None:
        """Publish ``message`` (durable before this returns), delayed and prioritized by its labels."""
        labels = message.labels
        headers = {"taskiq-task-id": message.task_id, "taskiq-task-name": message.task_name}
        retries = _int(labels.get("_retries"))
        if retries:
            headers["taskiq-retries"] = str(retries)
        history = self._history(message.task_id)
        if history:
            headers["taskiq-retry-history"] = history
        delay = min(MAX_DELAY, max(0.0, float(labels.get("delay") or 0)))
        priority = min(9, max(0, _int(labels.get("priority"))))
        # One dedup id for every try: a publish whose confirm was lost with the connection is stored once.
        dedup = uuid.uuid4().hex
        client = self._session().client
        await _retrying(
            lambda: client.publish(
                self.queue,
                message.message,
                headers=headers,
                delay=delay or None,
                priority=priority or None,
                dedup_id=dedup,
            )
        )

    def _history(self, task_id: str) -> str:
        """The retry history for a task sent again while one of its deliveries is being processed."""
        current = self._processing.get(task_id)
        if current is None:
            return ""
        self._sent_again.add(task_id)
        lines = [line for line in current.headers.get("taskiq-retry-history", "").split("\n") if line]
        reason = self._failed.get(task_id, "sent again")
        line = f"retry {len(lines) + 1}: {reason}".replace("\n", " ")
        lines.append(line if len(line) <= HISTORY_LINE else line[: HISTORY_LINE - 3] + "...")
        return "\n".join(lines[-HISTORY_LINES:])

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Lease messages of the queue, at most ``prefetch`` held at once, and yield them ackable."""
        holder = self._session()
        budget = Budget(self.prefetch)
        ready: asyncio.Queue[ReplikaMessage] = asyncio.Queue()

        def deliver(msgs: list[ReplikaMessage]) -> None:
            for msg in msgs:
                ready.put_nowait(msg)

        task = asyncio.get_running_loop().create_task(feed(holder, self.queue, budget, deliver, logger=log))
        try:
            while True:
                msg = await ready.get()
                task_id = msg.headers.get("taskiq-task-id", "")
                self._processing[task_id] = msg
                yield AckableMessage(data=msg.payload, ack=functools.partial(self._settle, msg, budget))
        finally:
            task.cancel()
            rest = [ready.get_nowait() for _ in range(ready.qsize())]
            if rest:
                holder.settle("requeue", rest)

    def _settle(self, msg: ReplikaMessage, budget: Budget) -> None:
        """taskiq's ack: an ack, or a reject to the dead-letter queue for a task that failed and was not sent
        again."""
        task_id = msg.headers.get("taskiq-task-id", "")
        failed = self._failed.pop(task_id, None)
        sent_again = task_id in self._sent_again
        self._sent_again.discard(task_id)
        if self._processing.get(task_id) is msg:
            del self._processing[task_id]
        op: Settle = "reject" if failed is not None and not sent_again and self.dead_letter else "ack"
        self._session().settle(op, [msg])
        budget.release(1)


class _Outcomes(TaskiqMiddleware):
    """Records each failed execution for the broker, which then dead-letters or annotates the retry."""

    def __init__(self, broker: ReplikaBroker) -> None:
        super().__init__()
        self._replika = broker

    def on_error(self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException) -> None:
        self._replika._failed[message.task_id] = f"{type(exception).__name__}: {exception}"


async def _retrying(call: Callable[[], Awaitable[object]]) -> None:
    """``call()``, tried again on a lost connection for up to :data:`KICK_RETRY_FOR` seconds."""
    deadline = time.monotonic() + KICK_RETRY_FOR
    backoff = 0.05
    while True:
        try:
            await call()
            return
        except ConnectionLost:
            if time.monotonic() + backoff > deadline:
                raise
            await asyncio.sleep(backoff)  # the broker is away: wait before reconnecting
            backoff = min(backoff * 2, 2.0)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
