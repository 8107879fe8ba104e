"""Blocking frameworks (kombu, Dramatiq) on the asyncio SDK: one event loop per process on a daemon thread.

Every :class:`Bridge` (one connection to the broker) of a process runs its :class:`~replika.AsyncClient`, its
:class:`~replika.contrib._holder.Holder` and its fetch loops on that loop; callers on any thread either block on
a call (publish, declare) with :meth:`Bridge.call`, or hand it work without waiting (settles) with
:meth:`Bridge.soon`. A forked child starts a loop and a connection of its own at its first call: a thread and a
socket do not survive ``fork`` in a usable state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import ssl as _ssl
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, ClassVar, TypeVar

import uvloop

from replika import AsyncClient, ConnectionLost, Message
from replika.contrib._holder import Budget, Holder, Settle

__all__ = ["Bridge", "LoopThread"]

T = TypeVar("T")

#: Seconds a blocking call waits for the broker before failing with ConnectionLost: beyond the SDK's own
#: connect timeout (10 s) plus a commit on a very slow disk.
CALL_TIMEOUT = 60.0
#: Seconds a close waits for queued settles to reach the broker.
SETTLE_DRAIN = 8.0


class LoopThread:
    """The process's event loop for the integrations (uvloop, on a daemon thread), started on first use."""

    _current: ClassVar[LoopThread | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="replika-contrib", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> LoopThread:
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():
                cls._current = LoopThread()
            return cls._current

    @classmethod
    def _after_fork(cls) -> None:
        # Locks may have been held by other threads at the fork, and the loop's thread is gone.
        cls._lock = threading.Lock()
        cls._current = None
        for bridge in list(_BRIDGES):
            bridge._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and block for its result (at most ``timeout`` seconds)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("replika: a blocking call was made on the integration's own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ConnectionLost(f"no reply from the broker within {timeout:g} s") from None

    def soon(self, fn: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


_BRIDGES: weakref.WeakSet[Bridge] = weakref.WeakSet()
os.register_at_fork(after_in_child=LoopThread._after_fork)


class Bridge:
    """One connection to the broker, used from blocking code on any thread.

    ``url``, ``token`` and ``ssl`` are the SDK's (``replika://host:port``, ``replikas://`` for TLS); ``lease``
    is the lease of every delivery in seconds (kept alive while held). ``logger`` gets the problems that no
    caller waits for (a settle refused, a lease lost).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        lease: float,
        client_name: str,
        logger: logging.Logger,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.url = url
        self.lease = lease
        self.timeout = timeout
        self.log = logger
        self._token = token
        self._ssl = ssl
        self._client_name = client_name
        self._pid = -1
        self._thread: LoopThread | None = None
        self._client: AsyncClient | None = None
        self._holder: Holder | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._outbox: deque[tuple[Settle, list[Message], Budget | None]] = deque()
        self._outbox_scheduled = False
        _BRIDGES.add(self)

    # ----------------------------------------------------------------------------------------------- setup
    def _ensure(self) -> tuple[LoopThread, Holder]:
        with self._lock:
            if self._closed:
                raise ConnectionLost("the connection was closed")
            if self._pid != os.getpid() or self._thread is None or self._holder is None:
                # First use, or a forked child holding its parent's objects: start afresh in this process.
                thread = LoopThread.get()
                self._holder = thread.run(self._make_holder(), self.timeout)
                self._thread = thread
                self._pid = os.getpid()
            return self._thread, self._holder

    async def _make_holder(self) -> Holder:
        client = AsyncClient(self.url, self._token, ssl=self._ssl, client_name=self._client_name)
        self._client = client
        holder = Holder(client, lease=self.lease, logger=self.log)
        holder.start()
        return holder

    @property
    def holder(self) -> Holder:
        """The holder (use it on the loop only)."""
        return self._ensure()[1]

    @property
    def thread(self) -> LoopThread:
        return self._ensure()[0]

    # ----------------------------------------------------------------------------------------------- calls
    def call(self, fn: Callable[[AsyncClient], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """Run ``fn(client)`` on the loop and return its result; its errors are raised here."""
        thread, holder = self._ensure()
        return thread.run(fn(holder.client), self.timeout if timeout is None else timeout)

    def soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop without waiting (thread-safe)."""
        self._ensure()[0].soon(fn, *args)

    def settle(self, op: Settle, msgs: Iterable[Message], budget: Budget | None = None) -> None:
        """Settle ``msgs`` without waiting (thread-safe); ``budget`` gets their places back."""
        batch = list(msgs)
        if not batch:
            return
        try:
            thread = self._ensure()[0]
        except ConnectionLost:
            # Closed: the leases ended with the connection and these messages are delivered again.
            self.log.info("replika: %s of %d message(s) after the connection was closed: dropped", op, len(batch))
            return
        self._outbox.append((op, batch, budget))  # deque.append is atomic: no lock between the threads
        if not self._outbox_scheduled:
            # One wake-up of the loop for all the settles made before it runs, not one per message.
            self._outbox_scheduled = True
            thread.soon(self._drain_outbox)

    def _drain_outbox(self, holder: Holder | None = None) -> None:  # on the loop
        self._outbox_scheduled = False
        holder = holder or self._holder
        if holder is None:
            return  # closing: _close drains what is left into the holder it closes
        while self._outbox:
            op, msgs, budget = self._outbox.popleft()
            holder.settle(op, msgs)
            if budget is not None:
                budget.release(len(msgs))

    def connect(self) -> None:
        """Open the connection now (a blocking call also opens it on first use)."""
        self.call(lambda client: client.connect())

    def close(self, timeout: float = 10.0) -> None:
        """Send what is still queued, wait until the broker has it, and close the connection: leases of
        messages not settled end with it, so they are delivered again. Later calls raise ConnectionLost and
        later settles are dropped."""
        with self._lock:
            alive = self._pid == os.getpid() and self._thread is not None and self._holder is not None
            self._closed = True
            thread, holder = self._thread, self._holder
            self._thread = self._holder = self._client = None
            self._pid = -1
        if alive and thread is not None and holder is not None:
            try:
                thread.run(self._close(holder), timeout)
            except ConnectionLost as exc:
                self.log.warning("replika: closing the connection did not finish: %s", exc)

    async def _close(self, holder: Holder) -> None:
        self._drain_outbox(holder)
        holder.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(holder.drain(), SETTLE_DRAIN)
        await holder.client.close()
