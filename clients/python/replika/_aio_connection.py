"""The I/O half of :class:`replika.AsyncClient`: an asyncio transport under the sans-IO core.

Everything protocol is in :class:`replika._core.ClientProtocol`; this moves its bytes (one write per loop turn),
resumes the futures of calls with their replies, pings a quiet connection, and waits for settles on
:meth:`AsyncConnection.flush`.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from typing import Any, Self

from replika._core import DEFAULT_URL, ClientProtocol, check, parse_url, tls_context
from replika.errors import ConnectionLost, ReplikaError
from replika_protocol import Frame

__all__ = ["AsyncConnection"]


class _Protocol(asyncio.Protocol):
    """Hands a connection's events to its client once :meth:`adopt` is called; what happens before (the
    server may refuse a connection the moment it is made) is kept and replayed then."""

    def __init__(self, client: AsyncConnection) -> None:
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


class AsyncConnection:
    """The connection of an :class:`~replika.AsyncClient` (its base class): see there."""

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
        # flush() calls: (settle mark, future of the error it is to raise, bound to it when its settles are answered)
        self._barriers: list[tuple[int, asyncio.Future[ReplikaError | None]]] = []

    @property
    def connected(self) -> bool:
        """True while the connection is open and the handshake is done."""
        return self._transport is not None

    @property
    def max_batch(self) -> int:
        """The server's limit on messages per request (known after connecting)."""
        return self._core.max_batch

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        error = exc[1] if len(exc) > 1 else None
        if not isinstance(error, BaseException):
            await self.close()
            return
        try:  # the body's exception stays the one raised; what closing found is noted on it, not lost
            await self.close()
        except ReplikaError as closing:
            error.add_note(f"closing the replika client raised {closing!r}")

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

    async def flush(self) -> None:
        """Wait until every ack, nack, reject and touch made on this client before this call is durable (the
        broker committed it), then raise the first of their errors not raised yet (:class:`~replika.StaleLease`
        naming the refused ids, or :class:`~replika.ConnectionLost` if the connection dropped first: those settles
        may or may not have been applied). A barrier: settles made after it are not waited for."""
        mark, error = await self._settled()
        self._raise_deferred(mark, error=error)

    async def _settled(self) -> tuple[int | None, ReplikaError | None]:
        """Wait for the settles made so far to be answered: their mark (None: not connected, so none is
        unconfirmed) and the first of their errors, taken for this caller to raise; raise :class:`ConnectionLost`
        if the connection was lost before they all were."""
        core = self._core
        if self._transport is None:
            return None, None
        mark = core.settle_mark()
        if core.settles.done_through(mark):
            return mark, None
        self._schedule_flush()
        barrier: asyncio.Future[ReplikaError | None] = asyncio.get_running_loop().create_future()
        self._barriers.append((mark, barrier))
        return mark, await barrier

    def _release_barriers(self) -> None:
        settles = self._core.settles
        kept = []
        for mark, barrier in self._barriers:
            if barrier.done():
                continue  # its flush() was cancelled
            if settles.done_through(mark):
                # Its error is taken now, for its waiter: another task's call, which raises errors of settles no
                # one waits for, may run first and would otherwise take it, and this waiter would return as if
                # its settles were applied (a "confirmed" ack that never was).
                barrier.set_result(settles.take_error(mark))
            else:
                kept.append((mark, barrier))
        self._barriers = kept

    def _raise_deferred(self, mark: int | None = None, last: bool = False, error: ReplikaError | None = None) -> None:
        """Raise ``error`` or else the oldest error of a settle up to request ``mark`` (any if None) not raised
        yet, if there is one; ``last`` (closing): with the others noted on it, as there will be no later call to
        raise them."""
        error = error or self._core.settles.take_error(mark)
        if error is None:
            return
        while last and (more := self._core.settles.take_error()) is not None:
            error.add_note(f"also: {more!r}")
        raise error

    async def close(self) -> None:
        """Wait for the settles not yet confirmed (as :meth:`flush` does), then close the connection. Unacked
        messages it leased become ready again at the broker. Raises the first error of a settle not waited for
        that no call has raised yet, with any others noted on it."""
        self._closed = True
        lost: ConnectionLost | None = None
        error: ReplikaError | None = None
        try:
            _, error = await self._settled()
        except ConnectionLost as exc:
            lost = exc
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
                self._keepalive = None
            if self._transport is not None:
                self._flush()
                self._transport.close()
                self._transport = None
            self._fail_pending(ConnectionLost("the client was closed"))
        self._raise_deferred(last=True, error=lost or error)

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
        barriers, self._barriers = self._barriers, []
        # Every barrier still here waits for a settle now lost: each waiter raises the ConnectionLost itself
        # (the core keeps it for a later call only for lost settles no barrier covers).
        covered = max((mark for mark, barrier in barriers if not barrier.done()), default=0)
        waiters, lost = self._core.connection_lost(covered)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)
        for _, barrier in barriers:
            if not barrier.done():
                if lost is not None:
                    barrier.set_exception(lost)
                else:
                    barrier.set_result(None)

    def _on_data(self, data: bytes) -> None:
        core = self._core
        for fut, frame in core.receive_data(data):
            fut.set_result(frame)
        if core.failure is not None:
            self._fail_pending(core.failure)
            self._abort()
            return
        if self._barriers:
            self._release_barriers()
        if core.has_data_to_send:  # fetches nobody waits for any more are handed back
            self._schedule_flush()

    # ----------------------------------------------------------------------------------------------- requests
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Coalesce every request made in this loop turn into one write (one syscall), settles included.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self._transport.is_closing():
            data = self._core.data_to_send()
            if data:
                self._transport.write(data)
                self._last_write = asyncio.get_running_loop().time()

    async def _send(self, rid: int, data: bytes, fetch_queue: str | None) -> Frame:
        fut = self._submit(rid, data, fetch_queue)
        self._schedule_flush()
        return await self._reply(fut, fetch_queue)

    def _submit(self, rid: int, data: bytes, fetch_queue: str | None) -> asyncio.Future[Frame]:
        """Queue request ``data``; the returned future gets its reply (await it with :meth:`_reply`)."""
        if self._transport is None:
            raise ConnectionLost("not connected")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._core.send(rid, data, fut, fetch_queue)
        return fut

    async def _reply(self, fut: asyncio.Future[Frame], fetch_queue: str | None) -> Frame:
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

    async def _ensure(self, deferred: bool = True) -> None:
        """Before a call: raise an error of an earlier settle not waited for (unless ``deferred`` is False), then
        connect if not connected."""
        if deferred and self._core.settles.has_errors:
            self._raise_deferred()
        if self._transport is None:
            await self.connect()

    async def _call(self, op: str, **fields: Any) -> Frame:
        await self._ensure()
        rid, data = self._core.request(op, **fields)
        return check(await self._send(rid, data, None))


def _waiting(fut: asyncio.Future[Frame]) -> bool:
    """Whether the caller still waits for this reply (a cancelled call's future is done)."""
    return not fut.done()
