"""Queue semantics over a :class:`~replika_server.store.Store`, with no sockets: group commit, long polls, timers.

Requests from every connection are queued with :meth:`Broker.submit` and executed together: one loop turn's worth
of requests becomes one store batch, i.e. one write transaction and one fsync. While a batch commits, new requests
pile up and become the next batch, so under load batches grow by themselves and the fsync cost per message falls.
Each request's callback runs only after its batch is durable.

When the store fails (a batch answered ``STORE_FAILED``: a write or fsync failed), the broker stops its timers
and sets :attr:`Broker.failed`; the server then shuts down, and the process exits for a restart to recover.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

import structlog

from replika_server.metrics import BATCH_OPS_BUCKETS, LATENCY_BUCKETS, Histogram
from replika_server.store import (
    Delivery,
    Expire,
    Fetch,
    Op,
    Operation,
    Release,
    Result,
    Store,
    StoreCode,
    StoreError,
)

__all__ = ["Broker", "Done", "FrontEnds"]

log = structlog.get_logger("replika.broker")

R = TypeVar("R")
#: Called with the op's result (of the type its ``Operation[R]`` names), or with the StoreError it failed with.
Done = Callable[[R | StoreError], None]
#: A done callback as the broker keeps it, for ops of every kind: each is only ever given its own op's result.
_AnyDone = Callable[[Result | StoreError], None]
_Job = tuple[Op, _AnyDone]


class FrontEnds(Protocol):
    """What the broker asks of the servers in front of it (implemented by the TCP server)."""

    def batch_handed_out(self) -> None:
        """Every result of a batch has been handed to its callback: write the replies now, one write per
        connection, instead of a loop turn later."""

    def reply_room(self, owner: int) -> int:
        """Bytes of replies ``owner`` may still be sent before it must read some (0: none)."""


# Coalesce lease-expiry timers: one wake-up serves every lease ending within this many seconds.
_TIMER_SLACK = 0.005


class _Waiter:
    """A fetch that found nothing and waits, until ``deadline``, for its queue to gain ready messages."""

    __slots__ = ("deadline", "done", "handle", "op", "state")

    PARKED, PENDING, FINISHED = 0, 1, 2

    def __init__(self, op: Fetch, done: Done[list[Delivery]], deadline: float) -> None:
        self.op = op
        self.done = done
        self.deadline = deadline
        self.handle: asyncio.TimerHandle | None = None
        self.state = self.PENDING


class Broker:
    """Serialises batches onto the store and parks long-polling fetches. One per server, on one event loop."""

    def __init__(self, store: Store, front_ends: FrontEnds | None = None, max_reply: int = 2**62) -> None:
        """``front_ends`` (None: no reply room limit, no batch notice) bounds what fetches produce for a client
        that does not read its replies: a fetch gets at most its owner's ``reply_room`` (but always at least one
        message, so up to one message more) and at most ``max_reply`` bytes; with no room, it waits until
        :meth:`resume` or until the owner's room comes back after a batch."""
        self._store = store
        self._front_ends = front_ends
        self._max_reply = max_reply
        self._loop = asyncio.get_running_loop()
        self._pending: list[_Job] = []
        self._task: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[_Waiter]] = {}
        self._owner_waiters: dict[int, set[_Waiter]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closing = False
        # While results are handed out, replies are only collected; the front ends' batch_handed_out then
        # writes them, one write per connection, without waiting for another loop turn.
        self.dispatching = False
        # Fetches of an owner with no outbound room wait here.
        self._deferred: dict[int, list[_Job]] = {}
        self.failure: StoreError | None = None  # the store's STORE_FAILED error, once it failed
        self.failed = asyncio.Event()  # set with failure: whoever runs the broker should stop it
        self.batch_ops = Histogram(BATCH_OPS_BUCKETS)  # requests per group commit
        self.commit_seconds = Histogram(LATENCY_BUCKETS)  # applying and committing one batch
        # Another broker's commit on a shared store (PostgreSQL) wakes long polls here too.
        store.on_readied(self._wake)
        # Leases, delays and TTLs that ran out while the broker was down are handled now, not at the first request.
        self._arm_timer()

    @property
    def batches(self) -> int:
        """Group commits run so far."""
        return self.batch_ops.count

    @property
    def batched_ops(self) -> int:
        """Requests those commits carried."""
        return int(self.batch_ops.sum)

    def resume(self, owner: int) -> None:
        """``owner`` drained its replies: let its held-back fetches run."""
        held = self._deferred.pop(owner, None)
        if held:
            self._pending.extend(held)
            if self._task is None:
                self._task = self._loop.create_task(self._run())

    @property
    def store(self) -> Store:
        return self._store

    def consumers(self, queue: str) -> int:
        """Fetches currently long-polling ``queue``."""
        return len(self._waiters.get(queue, ()))

    # ----------------------------------------------------------------------------------------------- submit
    def submit(self, op: Operation[R], done: Done[R]) -> None:
        """Queue ``op`` for the next batch; ``done`` gets its result once the batch is durable."""
        if self._closing:
            done(StoreError(StoreCode.SHUTTING_DOWN, "the broker is shutting down"))
            return
        self._pending.append((cast(Op, op), cast(_AnyDone, done)))
        if self._task is None:
            # The task's first step runs on the next loop turn, so every request parsed in this turn joins the batch.
            self._task = self._loop.create_task(self._run())

    def fetch(self, op: Fetch, wait: float, done: Done[list[Delivery]]) -> None:
        """Fetch, waiting up to ``wait`` seconds for the first message when none is ready."""
        if wait <= 0:
            self.submit(op, done)
            return
        # The deadline timer is only armed if the fetch has to park: most long polls find messages at once.
        waiter = _Waiter(op, done, self._loop.time() + wait)
        self._owner_waiters.setdefault(op.owner, set()).add(waiter)
        self.submit(op, functools.partial(self._waiter_result, waiter))

    def release(self, owner: int) -> None:
        """``owner`` (a connection) is gone: drop its long polls and end its leases."""
        for waiter in self._owner_waiters.pop(owner, ()):
            self._finish_waiter(waiter)
        self._deferred.pop(owner, None)  # nobody is left to answer
        self._release(owner)

    def _release(self, owner: int) -> None:
        def done(result: StoreError | None) -> None:
            # A Release in a batch whose commit failed was undone with it: nobody else will end these leases.
            # (Not after the store failed: it refuses every write, and the leases end with the process.)
            if isinstance(result, StoreError) and not self._closing and self.failure is None:
                self._release(owner)

        self.submit(Release(owner), done)

    # ----------------------------------------------------------------------------------------------- batches
    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                if self._front_ends is not None:
                    batch = self._fit_fetches(batch, self._front_ends.reply_room)
                    if not batch:
                        break
                # perf_counter, not loop.time(): uvloop's clock moves in millisecond steps, too coarse for commits.
                started = time.perf_counter()
                try:
                    result = await self._store.execute([op for op, _ in batch])
                except Exception:
                    log.exception("batch_failed", ops=len(batch))
                    error = StoreError(StoreCode.INTERNAL, "internal error")
                    for _, done in batch:
                        done(error)
                    continue
                # The failed commit's batch is all STORE_FAILED, later ones refuse every write: the first result
                # tells, at no cost per op.
                first = result.results[0] if result.results else None
                if type(first) is StoreError and first.code == StoreCode.STORE_FAILED and self.failure is None:
                    self._store_failed(first)
                self.batch_ops.observe(len(batch))
                self.commit_seconds.observe(time.perf_counter() - started)
                self.dispatching = True
                for (_, done), value in zip(batch, result.results, strict=True):
                    try:
                        done(value)
                    except Exception:  # one broken callback must not leave the rest of the batch unanswered
                        log.exception("reply_callback_failed")
                self.dispatching = False
                if self._front_ends is not None:
                    self._front_ends.batch_handed_out()
                for queue in result.readied:
                    self._wake(queue)
                self._arm_timer()
                if self._deferred:
                    self._recheck_deferred()
        finally:
            self._task = None

    def _store_failed(self, error: StoreError) -> None:
        self.failure = error
        if self._timer is not None:  # expiring leases would only be refused, and re-armed, for ever
            self._timer.cancel()
            self._timer = None
        self.failed.set()

    def _fit_fetches(self, batch: list[_Job], room_of: Callable[[int], int]) -> list[_Job]:
        """Size each fetch to its owner's outbound room, holding back those of owners with none."""
        rooms: dict[int, int] = {}
        kept: list[_Job] = []
        for item in batch:
            op = item[0]
            if type(op) is Fetch:
                owner = op.owner
                room = rooms.get(owner)
                if room is None:
                    room = room_of(owner)
                if room <= 0:
                    self._deferred.setdefault(owner, []).append(item)
                    rooms[owner] = 0
                    continue
                op.max_bytes = min(self._max_reply, room)
                rooms[owner] = room - op.max_bytes
            kept.append(item)
        return kept

    def _recheck_deferred(self) -> None:
        """Fetches held back within a batch (by earlier fetches' room) go again if their owner has room now.
        Owners still out of room have unsent replies above the high-water mark and will call :meth:`resume`."""
        assert self._front_ends is not None
        for owner in [o for o in self._deferred if self._front_ends.reply_room(o) > 0]:
            self._pending.extend(self._deferred.pop(owner))

    # ----------------------------------------------------------------------------------------------- long polls
    def _waiter_result(self, waiter: _Waiter, result: list[Delivery] | StoreError) -> None:
        if waiter.state == _Waiter.FINISHED:
            return  # its connection closed meanwhile; Release ends any lease it just got
        if result == [] and not self._closing and self._loop.time() < waiter.deadline:
            waiter.state = _Waiter.PARKED
            self._waiters.setdefault(waiter.op.queue, []).append(waiter)
            if waiter.handle is None:
                waiter.handle = self._loop.call_at(waiter.deadline, self._waiter_timeout, waiter)
            return
        self._finish_waiter(waiter)
        waiter.done(result)

    def _finish_waiter(self, waiter: _Waiter) -> None:
        if waiter.state == _Waiter.PARKED:
            parked = self._waiters.get(waiter.op.queue)
            if parked is not None:
                parked.remove(waiter)
                if not parked:
                    del self._waiters[waiter.op.queue]
        waiter.state = _Waiter.FINISHED
        if waiter.handle is not None:
            waiter.handle.cancel()
        owned = self._owner_waiters.get(waiter.op.owner)
        if owned is not None:
            owned.discard(waiter)

    def _waiter_timeout(self, waiter: _Waiter) -> None:
        waiter.handle = None
        if waiter.state == _Waiter.PARKED:
            self._finish_waiter(waiter)
            waiter.done([])
        # PENDING: its fetch is in a batch and will see the deadline has passed when it returns.

    def _wake(self, queue: str) -> None:
        parked = self._waiters.pop(queue, None)
        if not parked:
            return
        for waiter in parked:
            if self._closing:  # shutting down: a long poll ends empty, as it would at its deadline
                self._finish_waiter(waiter)
                waiter.done([])
                continue
            waiter.state = _Waiter.PENDING
            self.submit(waiter.op, functools.partial(self._waiter_result, waiter))

    # ----------------------------------------------------------------------------------------------- timers
    def _arm_timer(self) -> None:
        when = self._store.next_timer()
        poll = self._store.poll_interval
        if poll is not None:
            soon = self._store.clock.monotonic() + poll
            when = soon if when is None else min(when, soon)
        if when is None or self._closing or self.failure is not None:
            return
        when += _TIMER_SLACK
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        # The store speaks its own clock's monotonic time; the loop's clock may differ in base: hand it a delay.
        self._timer = self._loop.call_later(max(0.0, when - self._store.clock.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.submit(Expire(), lambda _: self._arm_timer())

    # ----------------------------------------------------------------------------------------------- shutdown
    async def close(self) -> None:
        """Refuse new requests, finish the batch in progress and what was queued before, end long polls."""
        self._closing = True  # first, so that a steady stream of requests cannot keep the drain going
        while self._task is not None:
            await self._task
        callbacks: list[Done[list[Delivery]]] = [w.done for parked in self._waiters.values() for w in parked]
        for parked in list(self._waiters.values()):
            for waiter in list(parked):
                self._finish_waiter(waiter)
        deferred, self._deferred = self._deferred, {}
        callbacks += [done for held in deferred.values() for _, done in held]  # fetches, all of them
        for done in callbacks:
            try:
                done([])  # a long poll ends empty, as at its deadline
            except Exception:  # one broken callback must not keep the store from closing
                log.exception("reply_callback_failed")
        if self._timer is not None:
            self._timer.cancel()
        await self._store.close()
