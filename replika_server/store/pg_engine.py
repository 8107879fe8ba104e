"""The PostgreSQL engine: every piece of queue state in PostgreSQL, so that any number of brokers serve the same
queues (``replika serve --store postgresql://...``). Tables and migrations: :mod:`.pg_schema`; the operations:
:mod:`._pg_publishing`, :mod:`._pg_delivery`, :mod:`._pg_queues`, :mod:`._pg_history`.

**Group commit.** One batch (the requests this node received in one loop turn) is one transaction, committed once;
its results are shown only after the commit returned, with the server's ``synchronous_commit`` (on by default:
the WAL is flushed, and with a synchronous standby it is on the standby too). A batch that deadlocks with another
node's (PostgreSQL aborts one of them) is run again from the start, up to :data:`RETRIES` times.

**Several nodes.** A commit that made messages ready sends one ``NOTIFY replika_ready`` naming this node and the
queues (never one per message); every node listens on a second connection and wakes its long polls on those
queues. A notification can be lost (the listening connection drops), so the broker also runs a timer every
:attr:`poll_interval` seconds, at which the engine looks again at the queues its long polls found empty, renews
this node's heartbeat and ends leases whose deadline passed, whoever granted them.

**Failures.** A connection that fails (the primary went away, a network cut) fails the batch with
``STORE_UNAVAILABLE``, which clients retry: nothing of it is confirmed (if the commit itself was cut off it may
have applied, so a retried publish may store twice, as at-least-once allows). The next batch connects again, to
whichever host of a multi-host URL is writable (``target_session_attrs=read-write``). The store never fails for
good as LMDB does: PostgreSQL owns durability, and a reconnected session sees exactly what was committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import psycopg.errors
import structlog
from psycopg import sql

from replika_server.store._pg_core import Batch
from replika_server.store._pg_queues import PgQueues
from replika_server.store._queue import QueueCounters
from replika_server.store.base import (
    Ack,
    BatchResult,
    Bind,
    Clock,
    Declare,
    DeleteQueue,
    Expire,
    Fetch,
    History,
    HistoryList,
    Nack,
    Op,
    Peek,
    Publish,
    PublishTopic,
    Purge,
    Redrive,
    Reject,
    Release,
    Settle,
    Stats,
    Store,
    StoreCode,
    StoreError,
    StoreOptions,
    Touch,
    Unbind,
)
from replika_server.store.pg_schema import migrate

__all__ = ["CHANNEL", "POLL_INTERVAL", "RETRIES", "PgStore"]

log = structlog.get_logger("replika.store")

#: The channel of the ready notifications, followed by the schema's name: channels are per database, and the
#: brokers of another schema of it serve other queues.
CHANNEL = "replika_ready"
#: Seconds between the broker's timer runs on this engine: the bound on a long poll's wait for a message whose
#: notification was lost, on ending a dead node's expired leases, and the heartbeat's period.
POLL_INTERVAL = 1.0
#: Times a batch that deadlocked with another node's is run again before its requests get STORE_UNAVAILABLE.
RETRIES = 5
#: Seconds a connection attempt may take before the batch is answered STORE_UNAVAILABLE.
CONNECT_TIMEOUT = 5
#: Bytes of queue names one notification carries (PostgreSQL's limit is 8000).
_NOTIFY_BYTES = 7000
#: Seconds between two reads of the tables' size (for max_size and the admin views).
_SIZE_EVERY = 10.0

_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
_RETRY_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_READ_ONLY = (Stats, Peek, History, HistoryList)


class PgStore(PgQueues, Store):
    """See the module docstring. Create with :meth:`open`."""

    engine = "postgresql"
    poll_interval = POLL_INTERVAL

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(options, node=secrets.randbits(62) + 1)
        self._url = url
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wake: Callable[[str], None] | None = None
        self._idle: set[str] = set()
        self._channel = CHANNEL
        self._next_wall: float | None = None
        self._size = 0
        self._size_at = 0.0
        self._busy = False
        self._closed = False
        self._handlers: dict[type, Callable[[Any], Any]] = {
            Declare: self._declare,
            Publish: self._publish,
            PublishTopic: self._publish_topic,
            Fetch: self._fetch,
            Ack: self._settle,
            Nack: self._settle,
            Reject: self._settle,
            Touch: self._settle,
            Purge: self._purge,
            DeleteQueue: self._delete_queue,
            Release: self._release,
            Expire: self._expire,
            Stats: self._stats,
            Peek: self._peek,
            Redrive: self._redrive,
            Bind: self._bind,
            Unbind: self._unbind,
            History: self._history_of,
            HistoryList: self._history_list,
        }

    @classmethod
    async def open(cls, url: str, options: StoreOptions) -> PgStore:
        """Connect to ``url``, create or migrate the schema, register this node and start listening."""
        store = cls(url, options)
        conn = await store._connect()
        found = await migrate(conn)
        row = await (await conn.execute("SELECT current_schema()")).fetchone()
        store._channel = f"{CHANNEL}.{row[0] if row else 'public'}"
        now = store._clock.time()
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO replika_nodes (id, heartbeat, started, host) VALUES (%s, %s, %s, %s)",
                (store._node, now, now, socket.gethostname()),
            )
        store._conn = conn
        await store._refresh()
        store._listener = asyncio.get_running_loop().create_task(store._listen())
        log.info("store_opened", engine="postgresql", node=store._node, schema_found=found)
        return store

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        return await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name="replika"
        )

    # ----------------------------------------------------------------------------------------------- interface
    @property
    def clock(self) -> Clock:
        return self._clock

    def next_timer(self) -> float | None:
        if self._next_wall is None:
            return None
        return self._next_wall - self._clock.time() + self._clock.monotonic()

    def size_bytes(self) -> int:
        return self._size

    def on_readied(self, wake: Callable[[str], None]) -> None:
        self._wake = wake

    # ----------------------------------------------------------------------------------------------- batches
    async def execute(self, ops: Sequence[Op]) -> BatchResult:
        if self._closed:
            raise RuntimeError("store is closed")
        if self._busy:
            raise RuntimeError("one batch at a time: the broker serialises execute()")
        self._busy = True
        try:
            return await self._execute(ops)
        finally:
            self._busy = False
            self._cursor = None

    async def _execute(self, ops: Sequence[Op]) -> BatchResult:
        for op in ops:
            if isinstance(op, Settle):
                # Once, here: an iterator (the request parser's zip) would not survive a second look or a retry.
                op.leases = [(int(mid), int(token)) for mid, token in op.leases]
        for attempt in range(RETRIES + 1):
            self._batch = Batch()
            if attempt:
                self._held = None  # the failed attempt counted its publishes: read the total again
            try:
                conn = self._conn if self._conn is not None and not self._conn.closed else await self._reconnect()
                results = await self._run(conn, ops)
            except _RETRY_ERRORS as exc:
                if attempt < RETRIES:
                    log.info("batch_retried", reason=type(exc).__name__, attempt=attempt + 1)
                    continue
                return self._unavailable(ops, f"the batch kept conflicting with other nodes' ({exc})")
            except _CONNECTION_ERRORS as exc:
                self._held = None
                await self._drop_connection()
                return self._unavailable(ops, f"PostgreSQL is unreachable ({exc})")
            except Exception:
                log.exception("batch_apply_failed")
                return BatchResult(
                    [StoreError(StoreCode.INTERNAL, "internal error while applying the batch")] * len(ops)
                )
            self._committed(self._batch)
            return BatchResult(results, self._batch.readied)
        raise AssertionError("unreachable")

    async def _run(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], ops: Sequence[Op]) -> list[Any]:
        results: list[Any] = []
        # Pipeline mode: a statement whose result no op waits for (BEGIN, the count write-back, NOTIFY) goes out
        # with the next one instead of costing a round trip of its own.
        async with conn.pipeline(), conn.transaction():
            self._cursor = conn.cursor(binary=True)  # bytea and numbers without a text round trip
            i = 0
            while i < len(ops):
                group = _group(ops, i)
                if len(group) == 1:
                    results.append(await self._single(ops[i]))
                elif type(group[0]) is Publish:
                    results.extend(await self._publish_group(group))  # type: ignore[arg-type]
                else:
                    results.extend(await self._consume_group(group))  # type: ignore[arg-type]
                i += len(group)
            await self._finish()
        return results

    async def _single(self, op: Op) -> Any:
        try:
            return await self._handlers[type(op)](op)
        except StoreError as exc:
            return exc

    async def _consume_group(self, group: Sequence[Fetch | Ack]) -> list[Any]:
        """Fetches and acks of one queue, interleaved as many consumers send them: the acks together, then the
        fetches together. That order gives every op the result it has in batch order as long as each ack is of a
        leased message (no fetch can take one), so it is checked first; otherwise they run one by one."""
        acks = [op for op in group if type(op) is Ack]
        fetches = [op for op in group if type(op) is Fetch]
        if acks and fetches and not await self._only_leased(acks):
            return [await self._single(op) for op in group]
        done: dict[int, Any] = {}
        if acks:
            done.update(zip(map(id, acks), await self._ack_group(acks), strict=True))
        if len(fetches) > 1:
            done.update(zip(map(id, fetches), await self._fetch_group(fetches), strict=True))
        elif fetches:
            done[id(fetches[0])] = await self._single(fetches[0])
        return [done[id(op)] for op in group]

    async def _only_leased(self, acks: list[Ack]) -> bool:
        """Whether ``acks``' queue exists and each message they name is absent or leased."""
        if await self._find(acks[0].queue) is None:
            return False
        ids = [mid for op in acks for mid, _ in op.leases]
        await self._cur.execute(
            "SELECT 1 FROM replika_messages WHERE queue = %s AND id = ANY(%b::bigint[]) AND state <> 1 LIMIT 1",
            (acks[0].queue, ids),
        )
        return await self._cur.fetchone() is None

    async def _finish(self) -> None:
        """The end of a batch's transaction: queue counts written back, history trimmed, long polls told."""
        dirty = sorted((q for q in self._batch.queues.values() if q.d_count or q.d_bytes), key=lambda q: q.name)
        if dirty:
            await self._cur.execute(
                "UPDATE replika_queues q SET count = q.count + d.c, bytes = q.bytes + d.b "
                "FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS d(name, c, b) WHERE q.name = d.name",
                ([q.name for q in dirty], [q.d_count for q in dirty], [q.d_bytes for q in dirty]),
            )
        for name in sorted(self._batch.history_published):
            q = await self._find(name)
            if q is not None:
                await self._trim_history(q, exact_only=True)
        if self._batch.readied:
            for payload in _notifications(self._node, sorted(self._batch.readied)):
                await self._cur.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
        if time.monotonic() - self._size_at > _SIZE_EVERY:
            await self._refresh_size()

    def _committed(self, batch: Batch) -> None:
        for name in batch.deleted:
            self._counters.pop(name, None)
            self._idle.discard(name)
        for name, changes in batch.counters.items():
            counters = self._counters.get(name)
            if counters is None:
                counters = self._counters[name] = QueueCounters()
            for key, n in changes.items():
                setattr(counters, key, getattr(counters, key) + n)
        if batch.timers:
            soonest = min(batch.timers)
            self._next_wall = soonest if self._next_wall is None else min(self._next_wall, soonest)

    def _unavailable(self, ops: Sequence[Op], why: str) -> BatchResult:
        log.warning("store_unavailable", error=why)
        error = StoreError(StoreCode.STORE_UNAVAILABLE, f"{why}; nothing of this request was confirmed: retry")
        return BatchResult([error] * len(ops))

    async def _reconnect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        self._conn = await self._connect()
        log.info("store_reconnected", engine="postgresql", node=self._node)
        async with self._conn.transaction():
            await self._conn.execute(
                "INSERT INTO replika_nodes (id, heartbeat, started, host) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat = EXCLUDED.heartbeat",
                (self._node, self._clock.time(), self._clock.time(), socket.gethostname()),
            )
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # already broken: closing it is only tidying up
                log.debug("close_failed", exc_info=True)

    async def _refresh(self) -> None:
        """Read the next timer and the tables' size (at open)."""
        assert self._conn is not None
        async with self._conn.transaction():
            self._cursor = self._conn.cursor(binary=True)
            try:
                self._next_wall = await self._next_due()
                await self._refresh_size()
            finally:
                self._cursor = None

    async def _refresh_size(self) -> None:
        await self._cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname LIKE 'replika\\_%%'"
        )
        row = await self._cur.fetchone()
        self._size = int(row[0]) if row else 0
        self._size_at = time.monotonic()

    # ----------------------------------------------------------------------------------------------- listening
    async def _listen(self) -> None:
        """Wake this node's long polls when another node's commit readied their queues; reconnect on failure
        (the timer's look at idle queues covers what is missed meanwhile)."""
        backoff = 0.2
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    backoff = 0.2
                    async for note in conn.notifies():
                        self._notified(note.payload)
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store_listen_failed", error=str(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _notified(self, payload: str) -> None:
        node, _, names = payload.partition(" ")
        if node == str(self._node) or self._wake is None:
            return  # this node's own commit: its batch result woke its long polls already
        for name in names.split():
            self._wake(name)

    # ----------------------------------------------------------------------------------------------- closing
    async def close(self) -> None:
        """End this node's leases (its connections are gone, as on a restart of the LMDB engine), deregister,
        and disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE replika_messages SET state = 0, node = 0, owner = 0 WHERE node = %s AND state = 1",
                    (self._node,),
                )
                await conn.execute("DELETE FROM replika_nodes WHERE id = %s", (self._node,))
        except psycopg.Error as exc:
            log.warning("store_close_failed", error=str(exc))  # its leases end at their deadline instead
        finally:
            await conn.close()


def _group(ops: Sequence[Op], i: int) -> Sequence[Op]:
    """The run of ops from ``i`` that executes as one: consecutive publishes without dedup ids, or consecutive
    acks, of one queue (the common batch: many producers', or many consumers', requests); else ``ops[i]`` alone."""
    first = ops[i]
    if type(first) is Publish and first.dedup_ids is None:
        kinds: tuple[type, ...] = (Publish,)
    elif type(first) in (Ack, Fetch):
        kinds = (Ack, Fetch)
    else:
        return ops[i : i + 1]
    j = i + 1
    while j < len(ops):
        op = ops[j]
        if type(op) not in kinds or op.queue != first.queue or (type(op) is Publish and op.dedup_ids is not None):  # type: ignore[union-attr]
            break
        j += 1
    return ops[i:j]


def _notifications(node: int, queues: list[str]) -> list[str]:
    """Payloads naming ``queues``, each "<node> <queue> <queue>..." within PostgreSQL's size limit."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for name in queues:
        if current and size + len(name) + 1 > _NOTIFY_BYTES:
            out.append(f"{node} " + " ".join(current))
            current, size = [], 0
        current.append(name)
        size += len(name) + 1
    if current:
        out.append(f"{node} " + " ".join(current))
    return out
