"""The embedded LMDB engine: durable messages in LMDB, delivery indexes in memory.

One batch of ops is applied to the in-memory index on the event loop, which also logs the LMDB writes it implies
and reads committed payloads through a read transaction. The write log is then replayed and committed (with its
fsync) on a single commit thread, so the loop keeps parsing the next batch's requests meanwhile: that overlap is
the group commit. Only one batch is ever in flight. If a commit fails, the in-memory index is rebuilt from LMDB,
which the failed transaction never touched, and every op of the batch gets the error.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import structlog

from replika_protocol import ErrorCode
from replika_server.store._queue import DELAYED, LEASED, READY, QueueState, Tracked
from replika_server.store._records import (
    QNUM,
    VALUE_HEAD_SIZE,
    decode_message,
    decode_meta,
    encode_message,
    encode_meta,
    pack_key,
    pack_state,
    unpack_key,
    unpack_state,
)
from replika_server.store._writes import Writes, replay
from replika_server.store.base import (
    Ack,
    BatchResult,
    DeadLetterReason,
    Declare,
    DeleteQueue,
    Delivery,
    Expire,
    Fetch,
    Nack,
    Op,
    Publish,
    Purge,
    QueueOptions,
    Reject,
    Release,
    Settle,
    Stats,
    Store,
    StoreError,
    Touch,
)

__all__ = ["LmdbConfig", "LmdbStore"]

log = structlog.get_logger("replika.store")

_QUEUE_PREFIX = b"q:"
_TOKEN_SEQ = b"token_seq"
_QNUM_SEQ = b"qnum_seq"
_SCHEMA = b"schema"
_SCHEMA_VERSION = b"1"

#: Batches of at most this many ops commit on the event loop thread instead of the commit thread.
INLINE_COMMIT_OPS = 1

#: Bytes a delivery takes on the wire beyond its stored value (array header, id, token, attempts, timestamp).
DELIVERY_OVERHEAD = 64

DEAD_LETTER_HEADERS = (
    "replika-dead-letter-queue",
    "replika-dead-letter-reason",
    "replika-dead-letter-id",
    "replika-dead-letter-attempts",
)


@dataclass(frozen=True, slots=True)
class LmdbConfig:
    """Settings of the LMDB engine. Sizes in bytes, durations in seconds.

    ``max_queues`` bounds the queues that Declare, Publish and Fetch may create (``TOO_MANY_QUEUES``); dead-letter
    queues created to receive a message are exempt, so they may take the count past it. ``default_max_length``
    (messages) and ``default_max_bytes`` (payload plus packed headers bytes) apply to every queue whose own
    :class:`QueueOptions` limit is None; None is unlimited.
    """

    path: Path
    durable: bool = True  # fsync every commit; False: the OS flushes, and we sync every sync_interval
    map_size: int = 256 * 1024 * 1024  # first map size; doubled on demand up to max_size
    max_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    # Each queue costs an index in memory and a meta record rewritten when touched; this stops a client that
    # publishes to ever new names from growing both without bound, while leaving room for any real deployment.
    max_queues: int = 10_000
    default_max_length: int | None = None
    default_max_bytes: int | None = None


class LmdbStore(Store):
    """See the module docstring. Create with :meth:`open`."""

    def __init__(self, config: LmdbConfig) -> None:
        self._config = config
        config.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(config.path),
            map_size=config.map_size,
            max_dbs=4,
            sync=config.durable,
            metasync=config.durable,
            readahead=False,
            max_readers=64,
        )
        self._meta_db = self._env.open_db(b"meta")
        self._msgs_db = self._env.open_db(b"msgs")
        self._state_db = self._env.open_db(b"state")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replika-commit")
        self._busy = False
        self._closed = False
        self._full = False  # at max_size: refuse publishes until deletes bring it back under
        # Room beyond max_size that only the batch which reached it, and later deletes, may use.
        self._reserve = max(4 * 1024 * 1024, config.max_size // 8)
        self._unleased: list[Tracked] = []  # leases this batch ended, restored if its commit fails
        self._sync_task: asyncio.Task[None] | None = None
        self._queues: dict[str, QueueState] = {}
        self._by_qnum: dict[int, QueueState] = {}
        self._owners: dict[int, set[Tracked]] = {}
        # (deadline, seq, leased together): one entry per fetch or touch, not per message. Entries go stale
        # when their messages are settled or re-leased; expiry checks each message's own deadline.
        self._lease_heap: list[tuple[float, int, list[Tracked]]] = []
        self._lease_seq = 0
        self._delay_heap: list[tuple[float, int, int]] = []  # (due unix s, qnum, id)
        self._token_seq = 0
        self._token_seq_stored = 0  # what LMDB holds: publishing alone need not rewrite it
        self._qnum_seq = 0
        # Per batch:
        self._writes = Writes()
        self._touched: dict[int, QueueState] = {}
        self._readied: set[str] = set()
        self._rtxn: lmdb.Transaction | None = None
        self._handlers: dict[type, Callable[[Any], Any]] = {
            Declare: self._declare,
            Publish: self._publish,
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
        }

    @classmethod
    async def open(cls, config: LmdbConfig) -> LmdbStore:
        """Open (creating if needed) the store at ``config.path`` and recover its state."""
        store = cls(config)
        started = time.perf_counter()
        store._load()
        log.info(
            "store_recovered",
            path=str(config.path),
            queues=len(store._queues),
            messages=sum(q.count for q in store._queues.values()),
            seconds=round(time.perf_counter() - started, 4),
            durable=config.durable,
        )
        if not config.durable:
            store._sync_task = asyncio.get_running_loop().create_task(store._sync_loop())
        return store

    # ----------------------------------------------------------------------------------------------- reading
    def next_timer(self) -> float | None:
        t: float | None = self._lease_heap[0][0] if self._lease_heap else None
        if self._delay_heap:
            due = self._delay_heap[0][0] - time.time() + time.monotonic()
            t = due if t is None else min(t, due)
        return t

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

    async def _execute(self, ops: Sequence[Op]) -> BatchResult:
        results: list[Any] = []
        self._unleased.clear()
        try:
            for op in ops:
                try:
                    results.append(self._handlers[type(op)](op))
                except StoreError as exc:
                    results.append(exc)
        except Exception:
            # A bug left the index half-changed; LMDB was not touched yet, so rebuild from it.
            log.exception("batch_apply_failed")
            self._recover_after_failure()
            err = StoreError(ErrorCode.INTERNAL, "internal error while applying the batch")
            return BatchResult([err] * len(ops))
        finally:
            if self._rtxn is not None:
                self._rtxn.abort()
                self._rtxn = None
        writes, self._writes = self._writes, Writes()
        touched, self._touched = self._touched, {}
        readied, self._readied = self._readied, set()
        for q in touched.values():
            if self._queues.get(q.name) is q:
                writes.meta[_QUEUE_PREFIX + q.name.encode()] = encode_meta(q.meta())
        if writes:
            if self._token_seq != self._token_seq_stored:
                writes.meta[_TOKEN_SEQ] = str(self._token_seq).encode()
            # A lone request gains nothing from overlapping its commit with parsing (nothing else is arriving),
            # and the thread hand-off costs it tens of microseconds of latency: commit it on the loop.
            error = await self._commit(writes, inline=len(ops) <= INLINE_COMMIT_OPS)
            if error is not None:
                self._recover_after_failure()
                return BatchResult([error] * len(ops))
            self._token_seq_stored = self._token_seq
            if writes.deletes and self._full:
                try:
                    self._full = self._used_bytes() > self._config.max_size * 0.9
                except lmdb.Error:
                    log.exception("store_usage_unknown")  # stay full; the batch itself committed fine
                if not self._full:
                    log.info("store_has_room_again")
        for q in touched.values():
            q.visible_hi = q.next_id
        return BatchResult(results, readied)

    async def _commit(self, writes: Writes, inline: bool = False) -> StoreError | None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if inline:
                    self._commit_sync(writes)
                else:
                    await loop.run_in_executor(self._executor, self._commit_sync, writes)
                return None
            except lmdb.MapFullError:
                size = self._env.info()["map_size"]
                soft = self._config.max_size
                if size < soft:
                    new_size = min(size * 2, soft)
                elif size < soft + self._reserve:
                    # At the configured size: refuse publishes from now on, but let this batch and the acks
                    # that will free space use the reserve (LMDB copies pages on write, so deletes need room).
                    log.warning("store_full", map_size=size, max_size=soft)
                    self._full = True
                    new_size = soft + self._reserve
                else:
                    self._full = True
                    return StoreError(ErrorCode.STORE_FULL, "the store has reached its maximum size")
                self._env.set_mapsize(new_size)  # no transaction is open in this process here
                log.info("store_map_grown", map_size=new_size)
            except lmdb.Error as exc:
                if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
                    log.warning("store_disk_full", error=str(exc))
                    self._full = True
                    return StoreError(ErrorCode.STORE_FULL, "the disk holding the store is full")
                log.error("store_commit_failed", error=str(exc))
                return StoreError(ErrorCode.INTERNAL, f"commit failed: {exc}")

    def _used_bytes(self) -> int:
        """Bytes of live pages (free pages excluded), i.e. what the data needs, not the file's high-water mark."""
        with self._env.begin() as txn:
            stats = [txn.stat(db) for db in (self._meta_db, self._msgs_db, self._state_db)]
        stats.append(self._env.stat())
        return sum((s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"] for s in stats)

    def _commit_sync(self, writes: Writes) -> None:
        with self._env.begin(write=True) as txn:
            replay(txn, writes, self._meta_db)

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._config.sync_interval)
            try:
                await loop.run_in_executor(self._executor, self._env.sync, True)
            except lmdb.Error:
                # Keep trying: relaxed mode's promise is a sync every interval, not one failure and silence.
                log.exception("store_sync_failed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sync_task is not None:
            self._sync_task.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._env.sync, True)
        self._executor.shutdown(wait=True)
        self._env.close()

    # ----------------------------------------------------------------------------------------------- recovery
    def _load(self) -> None:
        """Rebuild every in-memory structure from LMDB."""
        self._queues.clear()
        self._by_qnum.clear()
        self._owners.clear()
        self._lease_heap.clear()
        self._delay_heap.clear()
        now = time.time()
        with self._env.begin() as txn:
            schema = txn.get(_SCHEMA, db=self._meta_db)
            if schema not in (None, _SCHEMA_VERSION):
                raise RuntimeError(f"store schema {schema!r} is not supported by this version")
            self._token_seq_stored = int(txn.get(_TOKEN_SEQ, b"0", db=self._meta_db))
            self._token_seq = max(self._token_seq, self._token_seq_stored)
            self._qnum_seq = max(self._qnum_seq, int(txn.get(_QNUM_SEQ, b"0", db=self._meta_db)))
            cur = txn.cursor(db=self._meta_db)
            if cur.set_range(_QUEUE_PREFIX):
                for key, value in cur:
                    if not key.startswith(_QUEUE_PREFIX):
                        break
                    q = self._load_queue(txn, key[2:].decode(), decode_meta(value))
                    self._queues[q.name] = q
                    self._by_qnum[q.qnum] = q
            for key, value in txn.cursor(db=self._state_db):
                qnum, mid = unpack_key(key)
                owner_q = self._by_qnum.get(qnum)
                if owner_q is None:
                    continue
                attempts, token, due = unpack_state(value)
                stored = txn.get(key, db=self._msgs_db)
                size = len(stored) - VALUE_HEAD_SIZE if stored is not None else 0
                # Fresh messages are delivered in id order, so every id below a delivered one was delivered
                # (and has a state record) or is gone: the never-delivered run starts after the last of them.
                owner_q.cursor = max(owner_q.cursor, mid + 1)
                if due > now:
                    owner_q.track(mid, Tracked(qnum, mid, attempts, token, due, DELAYED, size))
                    self._delay_heap.append((due, qnum, mid))
                else:
                    owner_q.track(mid, Tracked(qnum, mid, attempts, token, 0.0, READY, size))
        heapq.heapify(self._delay_heap)
        if schema is None:
            with self._env.begin(write=True) as wtxn:
                wtxn.put(_SCHEMA, _SCHEMA_VERSION, db=self._meta_db)

    def _load_queue(self, txn: lmdb.Transaction, name: str, meta: dict[str, Any]) -> QueueState:
        """A queue's state from its meta record; the limits and ``bytes`` are absent from older records."""
        options = QueueOptions(meta["max_attempts"], meta["dead_letter"], meta.get("max_length"), meta.get("max_bytes"))
        size = meta.get("bytes")
        q = QueueState(name, meta["qnum"], meta["next_id"], meta["count"], size or 0, options)
        if size is None:
            # Written before byte accounting: count once, and let the next commit record the figure.
            prefix = QNUM.pack(q.qnum)
            cur = txn.cursor(db=self._msgs_db)
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:4] != prefix:
                        break
                    q.bytes += len(value) - VALUE_HEAD_SIZE
            self._touched[q.qnum] = q
        return q

    def _recover_after_failure(self) -> None:
        """Reload from LMDB, keeping the leases whose delivery was committed (their token is in LMDB)."""
        leases = [
            (q.qnum, mid, t.token, t.deadline, t.owner)
            for q in self._queues.values()
            for mid, t in q.tracked.items()
            if t.status == LEASED
        ]
        # Ended by the failed batch, so never ended durably:
        # (A nack of this batch already zeroed its record's token; the lease it ended is the one in LMDB.)
        leases += [(t.qnum, t.mid, t.token, t.deadline, t.owner) for t in self._unleased]
        self._unleased = []
        self._writes = Writes()
        self._touched = {}
        self._readied = set()
        # Counters only ever grow (scrapers take a drop for a restart); the failed batch's events stay counted.
        counters = {state.qnum: state.counters for state in self._queues.values()}
        self._load()
        for state in self._queues.values():
            state.counters = counters.get(state.qnum, state.counters)
        for qnum, mid, token, deadline, owner in leases:
            q = self._by_qnum.get(qnum)
            t = q.tracked.get(mid) if q is not None else None
            if q is not None and t is not None and token in (t.token, 0) and t.status == READY:
                self._lease(q, t, deadline, owner)
                self._lease_group(deadline, [t])

    # ----------------------------------------------------------------------------------------------- helpers
    def _read_txn(self) -> lmdb.Transaction:
        if self._rtxn is None:
            self._rtxn = self._env.begin(db=self._msgs_db)
        return self._rtxn

    def _queue(self, name: str) -> QueueState:
        q = self._queues.get(name)
        if q is None:
            raise StoreError(ErrorCode.NOT_FOUND, f"queue {name!r} does not exist")
        return q

    def _get_or_create(self, name: str, options: QueueOptions | None = None, *, limited: bool = True) -> QueueState:
        """The queue ``name``, created if missing; ``limited`` False creates it even past ``max_queues``."""
        q = self._queues.get(name)
        if q is None:
            max_queues = self._config.max_queues
            if limited and len(self._queues) >= max_queues:
                raise StoreError(
                    ErrorCode.TOO_MANY_QUEUES,
                    f"cannot create queue {name!r}: the store holds {len(self._queues)} queues, its max_queues is "
                    f"{max_queues}",
                )
            self._qnum_seq += 1
            q = QueueState(name, self._qnum_seq, 1, 0, 0, options or QueueOptions())
            self._queues[name] = q
            self._by_qnum[q.qnum] = q
            self._writes.meta[_QNUM_SEQ] = str(self._qnum_seq).encode()
            self._touched[q.qnum] = q
        return q

    def _lease(self, q: QueueState, t: Tracked, deadline: float, owner: int) -> None:
        """Mark ``t`` leased; the caller registers its deadline with :meth:`_lease_group`."""
        q.set_status(t, LEASED)
        t.deadline = deadline
        t.owner = owner
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = set()
        owned.add(t)

    def _lease_group(self, deadline: float, group: list[Tracked]) -> None:
        self._lease_seq += 1
        heapq.heappush(self._lease_heap, (deadline, self._lease_seq, group))

    def _unlease(self, t: Tracked) -> None:
        if t.status == LEASED:
            self._unleased.append(t)
            owned = self._owners.get(t.owner)
            if owned is not None:
                owned.discard(t)

    def _lease_ended(self, q: QueueState, t: Tracked) -> None:
        """A lease ended without an ack (expiry, closed connection, nack without delay)."""
        self._unlease(t)
        limit = q.options.max_attempts
        if limit is not None and t.attempts >= limit:
            self._dead_letter(q, t.mid, DeadLetterReason.MAX_ATTEMPTS)
        else:
            q.make_ready(t.mid, t)
            self._readied.add(q.name)

    def _remove(self, q: QueueState, mid: int) -> None:
        """Delete one message (the general path; acks take the batched :meth:`_ack`)."""
        key = pack_key(q.qnum, mid)
        t = q.tracked.get(mid)
        if t is not None:
            self._unlease(t)
            q.untrack(mid)
            q.bytes -= t.size
            self._writes.delete(self._state_db, key)
        else:  # never delivered: no callers today, but its size is only in LMDB
            value = self._read_txn().get(key)
            q.bytes -= len(value) - VALUE_HEAD_SIZE if value is not None else 0
        self._writes.delete(self._msgs_db, key)
        self._writes.deletes += 1
        q.count -= 1
        self._touched[q.qnum] = q

    def _dead_letter(self, q: QueueState, mid: int, reason: DeadLetterReason) -> None:
        value = self._read_txn().get(pack_key(q.qnum, mid))
        t = q.tracked.get(mid)
        attempts = t.attempts if t is not None else 0
        self._remove(q, mid)
        q.counters.dead_lettered += 1
        if value is None:  # cannot happen while the index mirrors LMDB; never invent a payload
            log.error("dead_letter_missing_message", queue=q.name, id=mid)
            return
        published_at, payload, headers = decode_message(value)
        headers = dict(headers or {})
        headers.update(zip(DEAD_LETTER_HEADERS, (q.name, reason.value, str(mid), str(attempts)), strict=True))
        # Neither max_queues nor the DLQ's own limits may refuse it: the message would be lost.
        dq = self._get_or_create(q.dead_letter, limited=False)
        dq_id = dq.next_id
        dq.next_id += 1
        dq.count += 1
        value = encode_message(published_at, payload, headers)
        dq.bytes += len(value) - VALUE_HEAD_SIZE
        self._writes.put(self._msgs_db, pack_key(dq.qnum, dq_id), value)
        self._touched[dq.qnum] = dq
        self._readied.add(dq.name)

    def _fresh(self, q: QueueState) -> Iterator[tuple[int, bytes | memoryview]]:
        """Never-delivered committed messages of ``q`` in id order, from its cursor."""
        cur = self._read_txn().cursor()
        if not cur.set_range(pack_key(q.qnum, q.cursor)):
            return
        qnum, hi, tracked = q.qnum, q.visible_hi, q.tracked
        for key, value in cur:
            kq, mid = unpack_key(key)
            if kq != qnum or mid >= hi:
                return
            if mid not in tracked:
                yield mid, value

    # ----------------------------------------------------------------------------------------------- ops
    def _declare(self, op: Declare) -> None:
        q = self._queues.get(op.queue)
        if q is None:
            self._get_or_create(op.queue, op.options)
        elif q.options != op.options:
            q.options = op.options
            self._touched[q.qnum] = q

    def _publish(self, op: Publish) -> tuple[int, int]:
        if self._full:
            raise StoreError(ErrorCode.STORE_FULL, "the store is full; consumers must drain it first")
        payloads = op.payloads
        n = len(payloads)
        now = time.time()
        headers = op.headers
        # Sized before anything changes: a batch that does not fit is refused whole, and creates no queue.
        if headers is None:
            values = None
            added = sum(map(len, payloads))
        else:
            values = [encode_message(now, payload, headers[i]) for i, payload in enumerate(payloads)]
            added = sum(map(len, values)) - n * VALUE_HEAD_SIZE
        q = self._queues.get(op.queue)
        self._check_room(op.queue, q, n, added)
        if q is None:
            q = self._get_or_create(op.queue)
        first = q.next_id
        qnum = q.qnum
        if values is None:
            head = encode_message(now, b"", None)  # the same for the whole batch: one concat per message
            items = [(pack_key(qnum, mid), head + payload) for mid, payload in enumerate(payloads, first)]
        else:
            items = [(pack_key(qnum, mid), value) for mid, value in enumerate(values, first)]
        self._writes.put_many(self._msgs_db, items)
        q.next_id = first + n
        q.counters.published += n
        q.count += n
        q.bytes += added
        self._touched[qnum] = q
        self._readied.add(q.name)
        return first, n

    def _check_room(self, name: str, q: QueueState | None, n: int, added: int) -> None:
        """Refuse a publish of ``n`` messages of ``added`` bytes that would take queue ``name`` (``q``, or None
        when it does not exist yet) past its max_length or max_bytes."""
        config = self._config
        if q is None:
            count = size = 0
            max_length, max_bytes = config.default_max_length, config.default_max_bytes
        else:
            count, size = q.count, q.bytes
            max_length, max_bytes = q.limits(config.default_max_length, config.default_max_bytes)
        if max_length is not None and count + n > max_length:
            raise StoreError(
                ErrorCode.QUEUE_FULL,
                f"queue {name!r} is full: it holds {count} messages, its max_length is {max_length}; "
                f"{n} more do not fit",
            )
        if max_bytes is not None and size + added > max_bytes:
            raise StoreError(
                ErrorCode.QUEUE_FULL,
                f"queue {name!r} is full: it holds {size} bytes, its max_bytes is {max_bytes}; {added} more do not fit",
            )

    def _fetch(self, op: Fetch) -> list[Delivery]:
        q = self._get_or_create(op.queue)
        out: list[Delivery] = []
        if q.count == len(q.tracked) and not q.n_ready:
            return out  # nothing ready: skip the read transaction entirely
        deadline = time.monotonic() + op.lease
        if q.peek_ready() is None:
            return self._fetch_fresh(q, op, deadline)
        limit = q.options.max_attempts
        fresh = self._fresh(q) if q.count > len(q.tracked) else iter(())
        nxt = next(fresh, None)
        txn = self._read_txn()
        state_db = self._state_db
        writes = self._writes
        budget = op.max_bytes
        group: list[Tracked] = []
        while len(out) < op.max:
            rid = q.peek_ready()
            if rid is not None and (nxt is None or rid < nxt[0]):
                t = q.tracked[rid]
                if limit is not None and t.attempts >= limit:
                    heapq.heappop(q.ready_heap)
                    self._dead_letter(q, rid, DeadLetterReason.MAX_ATTEMPTS)
                    continue
                mid = rid
                stored = txn.get(pack_key(q.qnum, mid))
                if stored is None:  # cannot happen while the index mirrors LMDB; drop the phantom, loudly
                    heapq.heappop(q.ready_heap)
                    log.error("tracked_message_missing", queue=q.name, id=mid)
                    q.untrack(mid)
                    q.bytes -= t.size  # the counters mirror what LMDB holds
                    q.count -= 1
                    self._writes.delete(state_db, pack_key(q.qnum, mid))
                    self._touched[q.qnum] = q
                    continue
                budget -= len(stored) + DELIVERY_OVERHEAD
                if budget < 0 and out:
                    break  # the reply must fit in one frame; the rest waits for the next fetch
                heapq.heappop(q.ready_heap)
                value = stored
                t.attempts += 1
            elif nxt is not None:
                mid, value = nxt
                budget -= len(value) + DELIVERY_OVERHEAD
                if budget < 0 and out:
                    break
                nxt = next(fresh, None)
                q.cursor = mid + 1
                t = Tracked(q.qnum, mid, 1, 0, 0.0, LEASED, len(value) - VALUE_HEAD_SIZE)
                q.track(mid, t)
            else:
                break
            self._token_seq += 1
            t.token = self._token_seq
            t.due = 0.0
            self._lease(q, t, deadline, op.owner)
            group.append(t)
            writes.put(state_db, pack_key(q.qnum, mid), pack_state(t.attempts, t.token, 0.0))
            published_at, payload, headers = decode_message(value)
            out.append((mid, t.token, t.attempts, published_at, payload, headers))
        if group:
            self._lease_group(deadline, group)
            q.counters.delivered += len(group)
        return out

    def _fetch_fresh(self, q: QueueState, op: Fetch, deadline: float) -> list[Delivery]:
        """The hot path of consuming a backlog: only never-delivered messages are ready, so they are read in key
        order straight off an LMDB cursor, with :meth:`_lease` and :func:`decode_message` inlined, and each
        stored key reused as its delivery record's key."""
        out: list[Delivery] = []
        cur = self._read_txn().cursor()
        if not cur.set_range(pack_key(q.qnum, q.cursor)):
            return out
        qnum, hi, tracked, owner, limit = q.qnum, q.visible_hi, q.tracked, op.owner, op.max
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = set()
        budget = op.max_bytes
        token = self._token_seq
        head = VALUE_HEAD_SIZE
        group: list[Tracked] = []
        records: list[tuple[bytes | memoryview, bytes]] = []
        last = 0
        for key, value in cur:
            kq, mid = unpack_key(key)
            if kq != qnum or mid >= hi:
                break
            if mid in tracked:
                continue
            size = len(value)
            budget -= size + DELIVERY_OVERHEAD
            if budget < 0 and out:
                break  # the reply must fit in one frame; the rest waits for the next fetch
            token += 1
            t = Tracked(qnum, mid, 1, token, 0.0, LEASED, size - head)
            t.deadline = deadline
            t.owner = owner
            tracked[mid] = t
            owned.add(t)
            group.append(t)
            records.append((key, pack_state(1, token, 0.0)))
            published_at, payload, headers = decode_message(value)
            out.append((mid, token, 1, published_at, payload, headers))
            last = mid
            if len(out) >= limit:
                break
        if group:
            q.n_leased += len(group)
            q.counters.delivered += len(group)
            q.cursor = last + 1
            self._token_seq = token
            self._writes.put_many(self._state_db, records)
            self._lease_group(deadline, group)
        return out

    def _ack(self, q: QueueState, leases: Iterable[Sequence[int]]) -> dict[int, str]:
        """The hot path of consuming: :meth:`_remove` inlined for a batch, one key per message for both DBs."""
        failed: dict[int, str] = {}
        tracked = q.tracked
        owners = self._owners
        unleased = self._unleased
        qnum = q.qnum
        keys: list[bytes] = []
        size = 0
        for mid, token in leases:
            t = tracked.get(mid)
            if t is None or t.token != token or not token:  # 0: a settled (nacked) delivery
                failed[mid] = ErrorCode.STALE_LEASE.value
                continue
            del tracked[mid]
            size += t.size
            if t.status == LEASED:
                q.n_leased -= 1
                unleased.append(t)
                owned = owners.get(t.owner)
                if owned is not None:
                    owned.discard(t)
            elif t.status == READY:
                q.n_ready -= 1
            else:
                q.n_delayed -= 1
            keys.append(pack_key(qnum, mid))
        if keys:
            self._writes.delete_many(self._msgs_db, keys)
            self._writes.delete_many(self._state_db, keys)
            self._writes.deletes += len(keys)
            q.count -= len(keys)
            q.counters.acked += len(keys)
            q.bytes -= size
            self._touched[qnum] = q
        return failed

    def _settle(self, op: Settle) -> dict[int, str]:
        q = self._queue(op.queue)
        if isinstance(op, Ack):
            return self._ack(q, op.leases)
        failed: dict[int, str] = {}
        tracked = q.tracked
        now = time.monotonic()
        for mid, token in op.leases:
            t = tracked.get(mid)
            if t is None or t.token != token or not token:  # 0: a settled (nacked) delivery
                failed[mid] = ErrorCode.STALE_LEASE.value
                continue
            if isinstance(op, Nack):
                self._nack(q, mid, t, op.delay, op.unseen)
            elif isinstance(op, Reject):
                self._dead_letter(q, mid, DeadLetterReason.REJECTED)
            elif isinstance(op, Touch):
                self._unlease(t)
                self._lease(q, t, now + op.lease, op.owner)
                self._lease_group(now + op.lease, [t])
        return failed

    def _nack(self, q: QueueState, mid: int, t: Tracked, delay: float, unseen: bool = False) -> None:
        q.counters.nacked += 1
        if unseen and t.attempts > 0:
            t.attempts -= 1  # persisted below with the settled token
        limit = q.options.max_attempts
        if delay <= 0 or (limit is not None and t.attempts >= limit):
            self._lease_ended(q, t)
            if q.tracked.get(mid) is t:  # not dead-lettered
                # Settled: this delivery's token may not ack, nack or touch any more, even after a restart.
                t.token = 0
                self._writes.put(self._state_db, pack_key(q.qnum, mid), pack_state(t.attempts, 0, 0.0))
            return
        self._unlease(t)
        t.token = 0
        t.due = time.time() + delay
        q.set_status(t, DELAYED)
        heapq.heappush(self._delay_heap, (t.due, q.qnum, mid))
        self._writes.put(self._state_db, pack_key(q.qnum, mid), pack_state(t.attempts, t.token, t.due))

    def _purge(self, op: Purge) -> int:
        q = self._queue(op.queue)
        keep = frozenset(mid for mid, t in q.tracked.items() if t.status == LEASED)
        removed = q.count - len(keep)
        for mid in [mid for mid in q.tracked if mid not in keep]:
            q.untrack(mid)
        q.ready_heap.clear()
        q.count = len(keep)
        q.bytes = sum(t.size for t in q.tracked.values())  # only the leased are left
        q.cursor = q.next_id
        self._writes.range_delete((self._msgs_db, self._state_db), q.qnum, keep, q.next_id)
        self._writes.deletes += removed
        self._touched[q.qnum] = q
        return removed

    def _delete_queue(self, op: DeleteQueue) -> None:
        q = self._queue(op.queue)
        for mid in list(q.tracked):
            t = q.tracked[mid]
            self._unlease(t)
        del self._queues[q.name]
        del self._by_qnum[q.qnum]
        self._touched.pop(q.qnum, None)
        self._writes.range_delete((self._msgs_db, self._state_db), q.qnum, frozenset())
        self._writes.meta[_QUEUE_PREFIX + q.name.encode()] = None
        self._writes.deletes += q.count

    def _current(self, t: Tracked) -> QueueState | None:
        """The queue of ``t`` if ``t`` is still the live record of its message (not settled, queue not gone)."""
        q = self._by_qnum.get(t.qnum)
        return q if q is not None and q.tracked.get(t.mid) is t else None

    def _release(self, op: Release) -> None:
        for t in self._owners.pop(op.owner, ()):
            q = self._current(t)
            if q is not None and t.status == LEASED and t.owner == op.owner:
                q.counters.expired += 1
                self._lease_ended(q, t)

    def _expire(self, op: Expire) -> None:
        now = time.monotonic()
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            deadline, _, group = heapq.heappop(heap)
            for t in group:
                if t.status != LEASED or t.deadline != deadline:
                    continue  # settled, touched or re-leased since
                q = self._current(t)
                if q is not None:
                    q.counters.expired += 1
                    self._lease_ended(q, t)
        wall = time.time()
        delays = self._delay_heap
        while delays and delays[0][0] <= wall:
            due, qnum, mid = heapq.heappop(delays)
            dq = self._by_qnum.get(qnum)
            delayed = dq.tracked.get(mid) if dq is not None else None
            if dq is None or delayed is None or delayed.status != DELAYED or delayed.due != due:
                continue
            dq.make_ready(mid, delayed)
            self._readied.add(dq.name)

    def _stats(self, op: Stats) -> list[Any]:
        defaults = self._config.default_max_length, self._config.default_max_bytes
        if op.queue is None:
            return [self._queues[name].stats(*defaults) for name in sorted(self._queues)]
        return [self._queue(op.queue).stats(*defaults)]
