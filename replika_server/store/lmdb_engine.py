"""The embedded LMDB engine: durable messages in LMDB, delivery indexes in memory.

One batch of ops is applied to the in-memory index on the event loop, which also logs the LMDB writes it implies
and reads committed payloads through a read transaction. The write log is then replayed and committed (with its
fsync) on a single commit thread, so the loop keeps parsing the next batch's requests meanwhile: that overlap is
the group commit. Only one batch is ever in flight. If a commit fails, the in-memory index is rebuilt from LMDB,
which the failed transaction never touched, and every op of the batch gets the error.

A commit that fails for any reason but a full map or disk fails the store (``STORE_FAILED``), for good: after a
failed write or fsync the kernel may have dropped the dirty pages and report the next fsync as fine (PostgreSQL's
"fsyncgate"), so no later commit could be trusted to carry them. From then on every op that would write is
refused with that error, reads (stats, peek) are answered from the last commit, and the broker exits so that a
restart reopens LMDB at its last durable commit.

What LMDB holds (layouts in :mod:`._records`): ``msgs`` (every message, under its lane's or the side prefix),
``state`` (a record per delivered, delayed or TTL'd message), ``dedup`` (dedup ids within their window),
``events`` (message history, laid out in :mod:`._history`) and ``meta`` (per queue its counters, options, lane
and side prefixes; bindings; the token and prefix sequences; the schema version). How the in-memory index is
laid out is in :mod:`._queue`; the operations are in :mod:`._delivery`, :mod:`._publishing` and here; recovery
(the index rebuilt from LMDB) in :mod:`._recovery`.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lmdb
import structlog

from replika_server.store._delivery import DEDUP_PRUNE_SLACK, Delivering
from replika_server.store._engine import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTER_PREFIX,
    DELIVERY_OVERHEAD,
    QUEUE_PREFIX,
    TOKEN_SEQ,
    LmdbConfig,
)
from replika_server.store._publishing import Publishing, binding_key
from replika_server.store._queue import LEASED
from replika_server.store._records import (
    QNUM,
    VALUE_HEAD_SIZE,
    decode_message,
    encode_meta,
)
from replika_server.store._recovery import Recovering
from replika_server.store._writes import Writes, replay
from replika_server.store.base import (
    Ack,
    BatchResult,
    Bind,
    Clock,
    Declare,
    DeleteQueue,
    EventKind,
    Expire,
    Fetch,
    History,
    HistoryList,
    Nack,
    Op,
    Peek,
    Peeked,
    Publish,
    PublishTopic,
    Purge,
    Redrive,
    Reject,
    Release,
    Stats,
    Store,
    StoreCode,
    StoreError,
    Touch,
    Unbind,
    is_valid_queue_name,
)

__all__ = ["LmdbConfig", "LmdbStore"]

log = structlog.get_logger("replika.store")

#: Batches of at most this many ops commit on the event loop thread instead of the commit thread, and so do
#: batches whose ops all come from one connection (see _commits_inline).
INLINE_COMMIT_OPS = 1

#: Ops that write nothing, answered from the last commit after the store failed.
_READ_ONLY = (Stats, Peek, History, HistoryList)

#: Free bytes on the store's disk below which a failed commit is put down to a full disk (STORE_FULL, retried
#: once there is room again) rather than to a failing one: LMDB reports a write that a full disk cut short as
#: EIO, not ENOSPC, and a short write leaves next to nothing free.
DISK_FULL_FREE = 1024 * 1024


class LmdbStore(Recovering, Delivering, Publishing, Store):
    """See the module docstring. Create with :meth:`open`."""

    engine = "lmdb"

    def __init__(self, config: LmdbConfig) -> None:
        super().__init__(config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replika-commit")
        self._busy = False
        self._closed = False
        # Room beyond max_size that only the batch which reached it, and later deletes, may use.
        self._reserve = max(4 * 1024 * 1024, config.max_size // 8)
        self._sync_task: asyncio.Task[None] | None = None
        self._failed: StoreError | None = None  # STORE_FAILED: a commit or sync failed, nothing more is written
        self._readable = True  # False if even reloading the last commit failed after that
        self._out_of_disk = False  # _full because the disk is: cleared when it has room again, not only by deletes
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
    async def open(cls, config: LmdbConfig) -> LmdbStore:
        """Open (creating if needed) the store at ``config.path`` and recover its state."""
        store = cls(config)
        started = time.perf_counter()
        try:
            store._load()
        except BaseException:
            store._env.close()
            store._lock.release()
            raise
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
    @property
    def clock(self) -> Clock:
        return self._clock

    def size_bytes(self) -> int:
        try:
            return (self._config.path / "data.mdb").stat().st_size
        except OSError:
            return 0

    def next_timer(self) -> float | None:
        t: float | None = self._lease_heap[0][0] if self._lease_heap else None
        # The other timers are wall-clock (they survive a restart); the broker wants monotonic time.
        wall = min(
            (
                heap[0][0]
                for heap in (self._delay_heap, self._ttl_heap, self._sweeps, self._prunes, self._history_timers)
                if heap
            ),
            default=None,
        )
        if wall is not None:
            due = wall - self._clock.time() + self._clock.monotonic()
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
            if self._failed is not None:
                return self._refuse(ops, self._failed)
            return await self._execute(ops)
        finally:
            self._busy = False

    async def _execute(self, ops: Sequence[Op]) -> BatchResult:
        results: list[Any] = []
        self._unleased.clear()
        if self._out_of_disk and self._free_disk() >= DISK_FULL_FREE:
            # Room again (files deleted, the disk grown): try publishes again; a commit that still does not fit
            # sets the flag back.
            self._full = self._out_of_disk = False
            log.info("store_has_room_again", reason="disk")
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
            err = StoreError(StoreCode.INTERNAL, "internal error while applying the batch")
            return BatchResult([err] * len(ops))
        finally:
            if self._rtxn is not None:
                self._rtxn.abort()
                self._rtxn = None
        if self._granted:
            self._push_out_grants()
        writes, self._writes = self._writes, Writes()
        touched, self._touched = self._touched, {}
        readied, self._readied = self._readied, set()
        for q in touched.values():
            if self._queues.get(q.name) is q:
                writes.meta[QUEUE_PREFIX + q.name.encode()] = encode_meta(q.meta())
        if writes:
            if self._token_seq != self._token_seq_stored:
                writes.meta[TOKEN_SEQ] = str(self._token_seq).encode()
            error = await self._commit(writes, inline=_commits_inline(ops))
            if error is not None:
                try:
                    self._recover_after_failure()
                except lmdb.Error:
                    if self._failed is None:
                        raise
                    log.exception("store_unreadable")  # LMDB may refuse every transaction after a fatal error
                    self._readable = False
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
                    return StoreError(StoreCode.STORE_FULL, "the store has reached its maximum size")
                self._env.set_mapsize(new_size)  # no transaction is open in this process here
                log.info("store_map_grown", map_size=new_size)
            except lmdb.Error as exc:
                enospc = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
                if enospc or self._free_disk() < DISK_FULL_FREE:
                    log.warning("store_disk_full", error=str(exc), free_bytes=self._free_disk())
                    self._full = self._out_of_disk = True
                    return StoreError(StoreCode.STORE_FULL, "the disk holding the store is full")
                return self._fail(exc)

    def _free_disk(self) -> int:
        """Bytes this process may still write on the store's disk (root may use the blocks kept for it)."""
        try:
            st = os.statvfs(self._config.path)
        except OSError:
            return 0
        return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize

    def _fail(self, exc: Exception) -> StoreError:
        """Fail the store for good (see the module docstring): the error every later write gets."""
        log.critical("store_failed", error=str(exc), path=str(self._config.path))
        self._failed = StoreError(
            StoreCode.STORE_FAILED, f"the store failed ({exc}); nothing more is written until the broker restarts"
        )
        return self._failed

    def _refuse(self, ops: Sequence[Op], failed: StoreError) -> BatchResult:
        """A batch after the store failed: reads answered from the last commit, every other op refused."""
        results: list[Any] = []
        for op in ops:
            if not (self._readable and type(op) in _READ_ONLY):
                results.append(failed)
                continue
            try:
                results.append(self._handlers[type(op)](op))
            except StoreError as exc:
                results.append(exc)
            except lmdb.Error:
                results.append(failed)
        if self._rtxn is not None:
            self._rtxn.abort()
            self._rtxn = None
        self._writes, self._touched, self._readied = Writes(), {}, set()  # reads log nothing; keep it that way
        return BatchResult(results)

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
            except lmdb.Error as exc:
                # Never try again: a second sync may succeed with the first one's pages already dropped.
                self._fail(exc)
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sync_task is not None:
            self._sync_task.cancel()
        loop = asyncio.get_running_loop()
        if self._failed is None:  # after a failure a sync would only pretend: what it covers may be gone
            await loop.run_in_executor(self._executor, self._env.sync, True)
        self._executor.shutdown(wait=True)
        self._env.close()
        self._lock.release()  # last: nobody may open the files while this process still writes them

    # ----------------------------------------------------------------------------------------------- queues
    def _declare(self, op: Declare) -> None:
        q = self._queues.get(op.queue)
        if q is None:
            self._get_or_create(op.queue, op.options)
            return
        old, q.options = q.options, op.options
        if old == op.options:
            return
        self._touched[q.qnum] = q
        new = op.options
        if new.history is None and old.history is not None:
            self._forget_history(q)
        if new.message_ttl and new.message_ttl != old.message_ttl:
            # Messages already there expire by the new TTL: the lanes' fronts now, the records by their own time.
            self._schedule_sweep(q, self._clock.time())
            for t in q.tracked.values():
                if t.status != LEASED:
                    published_at = self._published_at(t)
                    if published_at is not None:
                        self._watch(q, t, published_at)
        oldest = q.dedup.oldest()
        if new.dedup_window != old.dedup_window and oldest is not None:
            heapq.heappush(self._prunes, (oldest + new.dedup_window + DEDUP_PRUNE_SLACK, q.qnum))

    def _purge(self, op: Purge) -> int:
        q = self._queue(op.queue)
        keep: dict[int, set[int]] = {}
        for mid, t in q.tracked.items():
            if t.status == LEASED:
                keep.setdefault(t.qnum, set()).add(mid)
        self._record_purge(q, keep)
        kept = sum(map(len, keep.values()))
        removed = q.count - kept
        for mid in [mid for mid, t in q.tracked.items() if t.status != LEASED]:
            q.untrack(mid)
        for lane in q.order:
            lane.ready_heap.clear()
            lane.cursor = lane.last = q.next_id
        q.count = kept
        q.bytes = sum(t.size for t in q.tracked.values())  # only the leased are left
        for qnum in q.storage():
            self._writes.range_delete((self._msgs_db, self._state_db), qnum, frozenset(keep.get(qnum, ())), q.next_id)
        self._writes.deletes += removed
        self._touched[q.qnum] = q
        return removed

    def _delete_queue(self, op: DeleteQueue) -> None:
        q = self._queue(op.queue)
        for t in q.tracked.values():
            self._unlease(t)
        del self._queues[q.name]
        for qnum in q.storage():
            del self._by_qnum[qnum]
            self._writes.range_delete((self._msgs_db, self._state_db), qnum, frozenset())
        self._touched.pop(q.qnum, None)
        self._writes.meta[QUEUE_PREFIX + q.name.encode()] = None
        for pattern in q.bindings:
            self._bindings.remove(q.name, pattern)
            self._writes.meta[binding_key(q.name, pattern)] = None
        if q.dedup:
            self._writes.prefix_delete(self._dedup_db, QNUM.pack(q.qnum))
        self._forget_history(q)
        self._writes.deletes += q.count

    def _stats(self, op: Stats) -> list[Any]:
        defaults = self._config.default_max_length, self._config.default_max_bytes
        if op.queue is None:
            return [self._queues[name].stats(*defaults) for name in sorted(self._queues)]
        return [self._queue(op.queue).stats(*defaults)]

    def _peek(self, op: Peek) -> list[Peeked]:
        q = self._queue(op.queue)
        out: list[Peeked] = []
        if q.count == len(q.tracked) and not q.n_ready:
            return out
        now = self._clock.time()
        budget = op.max_bytes
        limit = q.options.max_attempts
        for lane in q.order:
            for mid, value, t in self._view(q, lane):
                published_at, payload, headers = decode_message(value)
                if self._expired(q, t, published_at, now) or (
                    t is not None and limit is not None and t.attempts >= limit
                ):
                    continue  # a fetch would move it out, not deliver it: not shown either
                budget -= len(value) + DELIVERY_OVERHEAD
                if (budget < 0 and out) or len(out) >= op.max:
                    return out
                out.append((mid, t.attempts if t is not None else 0, published_at, payload, headers))
        return out

    def _redrive(self, op: Redrive) -> int:
        q = self._queue(op.queue)
        moved = 0
        now = self._clock.time()
        for lane in q.order:
            aside: list[int] = []  # ready records left in place, off the heap until the walk is over
            for mid, value, t in self._walk(q, lane):
                if moved >= op.max:
                    break
                published_at, payload, headers = decode_message(value)
                size = len(value) - VALUE_HEAD_SIZE
                if self._expired(q, t, published_at, now):
                    if t is None:
                        lane.cursor = mid + 1
                    self._expire_message(q, mid, lane.qnum if t is None else t.qnum, lane.prio, value)
                    continue
                target = op.to or (headers or {}).get(DEAD_LETTER_HEADERS[0])
                if target is None or target == q.name or not is_valid_queue_name(target):
                    if t is None:
                        self._pin(q, lane, mid, size)
                    else:
                        heapq.heappop(lane.ready_heap)
                    aside.append(mid)
                    continue
                if t is None:
                    lane.cursor = mid + 1
                self._remove(q, mid, lane.qnum if t is None else t.qnum, size)
                kept = {k: v for k, v in (headers or {}).items() if not k.startswith(DEAD_LETTER_PREFIX)}
                # A move, like dead-lettering: neither max_queues nor the target's limits may refuse it half-way.
                to = self._get_or_create(target, limited=False)
                self._append(to, lane.prio, now, payload, kept or None)
                if q.options.history is not None or to.options.history is not None:
                    self._record_moved(q, mid, to, EventKind.REDRIVEN, value)
                moved += 1
            for mid in aside:
                heapq.heappush(lane.ready_heap, mid)
            if moved >= op.max:
                break
        return moved


def _commits_inline(ops: Sequence[Op]) -> bool:
    """Whether a batch commits on the event loop. The commit thread lets the loop parse other connections'
    requests while a commit and its fsync run; a lone request, or the requests of one connection (a consumer's
    fetch with its acks), gain nothing from that, since nothing else is arriving, and the thread hand-off costs
    them about 90 us a batch. Ops of no connection (timers, owner 0) do not count."""
    if len(ops) <= INLINE_COMMIT_OPS:
        return True
    first = 0
    for op in ops:
        owner = getattr(op, "owner", 0)
        if owner:
            if not first:
                first = owner
            elif owner != first:
                return False
    return True
