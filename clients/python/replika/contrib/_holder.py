"""The asyncio side that every integration shares.

A :class:`Holder` keeps the deliveries one client holds leased (``touch`` every third of the lease) and settles
them in batches; :class:`Budget` bounds how many a consumer holds at once; :func:`feed` long-polls a queue and
hands each batch on. All of it runs on one event loop and is called only there.

Settles are sent without the caller waiting: a framework's ``ack`` returns at once, and the acks of one loop
turn go out as one request. Whether the SDK's ``ack`` waits for the broker's commit or not, :meth:`Holder.drain`
is the barrier that makes them durable before a connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

from replika import AsyncClient, ConnectionLost, Message, ReplikaError, StaleLease

__all__ = ["DEFAULT_LEASE", "POLL", "Budget", "Holder", "Settle", "feed"]

Settle = Literal["ack", "nack", "requeue", "reject"]

#: Seconds a delivery is leased for; the holder touches it every third of that while it is held, so the lease
#: only matters when the holding process stops (its connection closing ends it at once) or hangs.
DEFAULT_LEASE = 30.0
#: Seconds one fetch parks on the broker waiting for a message: an idle consumer costs one request (and no
#: commit) per period. Short because the broker (0.1.0) keeps a closed connection's leases until the fetch it
#: had parked runs out: a worker killed with kill -9 gives its messages back at most this late.
POLL = 1.0
#: Messages one fetch asks for when the consumer sets no limit of its own (no-ack consumers).
UNBOUNDED_FETCH = 100
#: A fetch waits until this fraction of the budget is free. A fetch of one message per ack would cost the broker
#: a commit per message; measured with Celery (bench W8, prefetch 8), three quarters beat one half by ~10% and
#: halved the broker's CPU per task, the quarter still held keeping the pool busy while the fetch's commit runs.
FETCH_FRACTION = 0.75
#: Reconnect backoff of a fetch loop, seconds: first delay and ceiling (doubling, with jitter).
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
#: Seconds a settle may wait for the next fetch to ride with. The broker commits (and syncs) once per batch of
#: requests; acks sent with the fetch that their freed room allows land in the same batch, one commit for both.
SETTLE_LINGER = 0.005
#: Seconds a settle that failed on a lost connection keeps being retried: its lease token stays current until
#: the message is delivered again, so an ack sent after the reconnect still deletes it.
SETTLE_RETRY_FOR = 30.0


class Budget:
    """How many messages one consumer (or kombu channel) may hold at once: ``limit`` (0: no limit of its own).

    Fetches in flight reserve their ``max`` from it. A fetch goes out once three quarters of the limit are free (or when
    nothing at all is held or asked for), even while another is in flight: a busy consumer fetches in batches,
    each batch and the acks that made room for it sharing one commit of the broker, yet refills its slots
    without waiting for a fetch's round trip (which includes that commit) to end first.
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = max(0, limit)
        self.held = 0
        self.reserved = 0
        self._changed = asyncio.Event()

    def set_limit(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._changed.set()

    def take(self, n: int) -> None:
        self.held += n

    def release(self, n: int = 1) -> None:
        self.held = max(0, self.held - n)
        self._changed.set()

    def reserve(self, n: int) -> None:
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)
        self._changed.set()

    def room(self) -> int:
        if self.limit == 0:
            return 0 if self.reserved else UNBOUNDED_FETCH
        return self.limit - self.held - self.reserved

    async def wait_for_room(self) -> int:
        """The number of messages the next fetch may lease, once that is worth a fetch."""
        while True:
            room = self.room()
            if room >= max(1, int(self.limit * FETCH_FRACTION)) or (room > 0 and self.held == 0 and self.reserved == 0):
                return room
            self._changed.clear()
            await self._changed.wait()


class Holder:
    """The deliveries one :class:`~replika.AsyncClient` holds: leases kept alive, settles batched.

    ``lease`` is in seconds. Call :meth:`start` on the loop, :meth:`hold` for each delivery handed to the
    application, :meth:`settle` when it is done with one, :meth:`drain` before closing.
    """

    def __init__(self, client: AsyncClient, *, lease: float, logger: logging.Logger) -> None:
        if lease <= 0:
            raise ValueError("lease must be a positive number of seconds")
        self.client = client
        self.lease = lease
        self._log = logger
        self._held: dict[str, dict[int, Message]] = {}
        self._pending: dict[Settle, list[Message]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._keepalive: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._keepalive is None:
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    @property
    def held(self) -> int:
        return sum(len(by_id) for by_id in self._held.values())

    def hold(self, msgs: Iterable[Message]) -> None:
        for msg in msgs:
            self._held.setdefault(msg.queue, {})[msg.id] = msg

    def forget(self, msg: Message) -> None:
        """Stop touching ``msg`` (it was settled, or its lease is no longer ours)."""
        by_id = self._held.get(msg.queue)
        if by_id is not None and by_id.get(msg.id) is msg:
            del by_id[msg.id]

    def settle(self, op: Settle, msgs: Iterable[Message]) -> None:
        """Queue ``op`` for ``msgs``: ``ack``, ``nack`` (the queue's retry delay), ``requeue`` (nack, ready at
        once) or ``reject`` (to the dead-letter queue). Sent with the next fetch, or :data:`SETTLE_LINGER`
        seconds from now, whichever comes first, together with the others queued meanwhile."""
        batch = self._pending.setdefault(op, [])
        for msg in msgs:
            self.forget(msg)
            batch.append(msg)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(SETTLE_LINGER, self._flush)

    def flush(self) -> None:
        """Send the queued settles now (a fetch about to go out calls this, so both share one commit)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for op, msgs in pending.items():
            if msgs:
                task = loop.create_task(self._send(op, msgs, time.monotonic() + SETTLE_RETRY_FOR))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, op: Settle, msgs: list[Message], deadline: float) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                # Waited for: these are already batched over SETTLE_LINGER, and waiting makes a refusal or a lost
                # connection this batch's own error (retried or logged here), never a later call's.
                if op == "ack":
                    await self.client.ack(msgs, wait=True)
                elif op == "nack":
                    await self.client.nack(msgs, wait=True)
                elif op == "requeue":
                    await self.client.nack(msgs, delay=0.0, wait=True)
                else:
                    await self.client.reject(msgs, wait=True)
                return
            except StaleLease as exc:
                self._log.warning(
                    "replika: %s of %d message(s) of %s refused: lease no longer current (delivered again "
                    "since; the work may be done twice): ids %s",
                    op,
                    len(exc.failed),
                    msgs[0].queue,
                    sorted(exc.failed),
                )
                return
            except ConnectionLost as exc:
                if time.monotonic() + backoff > deadline:
                    self._log.error("replika: %s of %d message(s) lost with the connection: %s", op, len(msgs), exc)
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except ReplikaError as exc:
                self._log.error("replika: %s of %d message(s) of %s failed: %s", op, len(msgs), msgs[0].queue, exc)
                return

    async def drain(self) -> None:
        """Send every queued settle and wait until the broker has committed it (each batch is waited for)."""
        self.flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            by_queue = [(queue, list(by_id.values())) for queue, by_id in self._held.items() if by_id]
            if by_queue:
                await asyncio.gather(*(self._touch(queue, msgs) for queue, msgs in by_queue))

    async def _touch(self, queue: str, msgs: list[Message]) -> None:
        try:
            await self.client.touch(msgs, lease=self.lease, wait=True)
        except StaleLease as exc:
            # Delivered again since (the lease ran out while this process could not touch it): the other
            # delivery owns it now. The application may still settle its copy; that settle will be refused.
            by_id = self._held.get(queue, {})
            for msg_id in exc.failed:
                by_id.pop(int(msg_id), None)
            self._log.warning(
                "replika: lost the lease of %d message(s) of %s: ids %s", len(exc.failed), queue, sorted(exc.failed)
            )
        except ReplikaError as exc:
            # A lost connection ended these leases; the next round's touch takes back those not delivered again.
            self._log.debug("replika: touch of %d message(s) of %s failed: %s", len(msgs), queue, exc)


async def feed(
    holder: Holder,
    queue: str,
    budget: Budget,
    deliver: Callable[[list[Message]], None],
    *,
    logger: logging.Logger,
    no_ack: bool = False,
    poll: float = POLL,
) -> None:
    """Lease messages of ``queue`` within ``budget`` and hand each batch to ``deliver``, for ever (cancel the
    task to stop: fetches in flight then hand their messages back). Fetches long-poll ``poll`` seconds, so an
    idle queue costs no sleeping loop; several may be in flight (see :class:`Budget`). A lost connection is
    retried with backoff; the SDK reconnects.

    With ``no_ack`` the messages are acked as they arrive (at-most-once, for consumers that asked for it).
    """
    loop = asyncio.get_running_loop()
    state = _FeedState()
    fetches: set[asyncio.Task[None]] = set()
    try:
        while True:
            room = await budget.wait_for_room()
            pause = state.retry_at - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            budget.reserve(room)
            holder.flush()  # queued acks ride with this fetch: one commit for both
            task = loop.create_task(_fetch(holder, queue, budget, room, deliver, state, logger, no_ack, poll))
            fetches.add(task)
            task.add_done_callback(fetches.discard)
    finally:
        for task in fetches:
            task.cancel()


class _FeedState:
    def __init__(self) -> None:
        self.retry_at = 0.0
        self.backoff = BACKOFF_FIRST


async def _fetch(
    holder: Holder,
    queue: str,
    budget: Budget,
    room: int,
    deliver: Callable[[list[Message]], None],
    state: _FeedState,
    logger: logging.Logger,
    no_ack: bool,
    poll: float,
) -> None:
    try:
        msgs = await holder.client.fetch(queue, max=room, wait=poll, lease=holder.lease)
    except ReplikaError as exc:
        loop = asyncio.get_running_loop()
        if state.retry_at <= loop.time():
            level = logging.INFO if exc.retriable else logging.ERROR
            logger.log(level, "replika: fetch from %s failed (retrying in %.2f s): %s", queue, state.backoff, exc)
            state.retry_at = loop.time() + state.backoff * (1 + random.random())
            state.backoff = min(state.backoff * 2, BACKOFF_MAX)
        return
    finally:
        budget.unreserve(room)
    state.backoff = BACKOFF_FIRST
    if not msgs:
        return
    if no_ack:
        holder.settle("ack", msgs)
    else:
        holder.hold(msgs)
        budget.take(len(msgs))
    deliver(msgs)
