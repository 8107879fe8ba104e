"""The LMDB engine's shared state and the primitives every operation is built from.

:class:`EngineCore` holds the environment, the in-memory indexes and the per-batch write log, and knows how to
read the ready messages of a lane, lease, remove, append and dead-letter one message. The operations themselves
live in :mod:`._delivery` (fetch, settle, timers), :mod:`._publishing` (publish, topics, overflow, dedup) and
:mod:`.lmdb_engine` (the batch lifecycle, recovery and queue management), each a subclass of this one.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import structlog

from replika_server.store._lock import FILE_MODE, DirectoryLock, tighten_modes
from replika_server.store._queue import LEASED, READY, Lane, QueueState, Tracked
from replika_server.store._records import (
    VALUE_HEAD_SIZE,
    decode_message,
    encode_message,
    pack_key,
    pack_state,
    pack_state_ext,
    published_at_of,
    unpack_key,
)
from replika_server.store._topics import Bindings
from replika_server.store._writes import Writes
from replika_server.store.base import (
    SYSTEM_CLOCK,
    Clock,
    DeadLetterReason,
    QueueOptions,
    StoreCode,
    StoreError,
    StoreOptions,
)

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DEAD_LETTER_PREFIX",
    "DELIVERY_OVERHEAD",
    "QNUM_SEQ",
    "QUEUE_PREFIX",
    "READABLE_SCHEMAS",
    "SCHEMA_KEY",
    "SCHEMA_VERSION",
    "TOKEN_SEQ",
    "EngineCore",
    "LmdbConfig",
]

log = structlog.get_logger("replika.store")

# Keys of the meta database.
QUEUE_PREFIX = b"q:"
TOKEN_SEQ = b"token_seq"
QNUM_SEQ = b"qnum_seq"
SCHEMA_KEY = b"schema"
# 2: lanes, the side prefix, extended state records, the dedup database and bindings. A store of schema 1 is a
# store of schema 2 that uses none of them, so it is read as is (and marked 2 on open).
# 3: message history in the `events` database, keyed by (queue, sequence), one record per batch of alike events;
# schema 2 had one record per event keyed by (queue, message, sequence) in `history`, moved on open (_history).
# 4: first deliveries of a fetch recorded as a grant in the queue's meta record (_queue) rather than a state record
# each; a schema-3 store has no grants, so it is read as is (and marked 4 on open: older servers would take the
# messages of a grant for never-delivered ones).
SCHEMA_VERSION = b"4"
READABLE_SCHEMAS = (None, b"1", b"2", b"3", b"4")

#: The map LMDB starts with, in bytes: room for a few hundred thousand small messages before the first growth,
#: which doubles it (address space, not disk: the file grows only by what is written).
FIRST_MAP_SIZE = 256 * 1024 * 1024

#: Bytes a delivery takes on the wire beyond its stored value (array header, id, token, attempts, timestamp).
DELIVERY_OVERHEAD = 64

DEAD_LETTER_PREFIX = "replika-dead-letter-"
DEAD_LETTER_HEADERS = (
    "replika-dead-letter-queue",
    "replika-dead-letter-reason",
    "replika-dead-letter-id",
    "replika-dead-letter-attempts",
)

#: A message read together with where it stands: (id, stored value, its record or None if never delivered).
Ready = tuple[int, "bytes | memoryview", "Tracked | None"]


@dataclass(frozen=True, slots=True)
class LmdbConfig:
    """Settings of the LMDB engine: :class:`~replika_server.store.base.StoreOptions`' (see there) plus the store's
    directory and the first map size. Sizes in bytes, durations in seconds."""

    path: Path
    durable: bool = True  # fsync every commit; False: the OS flushes, and we sync every sync_interval
    map_size: int = FIRST_MAP_SIZE  # doubled on demand up to max_size
    max_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    # Each queue costs an index in memory and a meta record rewritten when touched; this stops a client that
    # publishes to ever new names from growing both without bound, while leaving room for any real deployment.
    max_queues: int = 10_000
    default_max_length: int | None = None
    default_max_bytes: int | None = None
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def of(cls, path: Path, options: StoreOptions) -> LmdbConfig:
        return cls(
            path=path,
            durable=options.durable,
            map_size=min(FIRST_MAP_SIZE, options.max_size),
            max_size=options.max_size,
            sync_interval=options.sync_interval,
            max_queues=options.max_queues,
            default_max_length=options.default_max_length,
            default_max_bytes=options.default_max_bytes,
            clock=options.clock,
        )


def state_value(t: Tracked) -> bytes:
    """The state record of ``t`` (from now on ``t`` is :attr:`~Tracked.recorded`): the short form unless it has a
    priority or an expiry of its own."""
    t.recorded = True
    if t.prio or t.expires:
        return pack_state_ext(t.attempts, t.token, t.due, t.expires, t.prio)
    return pack_state(t.attempts, t.token, t.due)


class EngineCore:
    """State shared by the engine's operations; see the module docstring."""

    def __init__(self, config: LmdbConfig) -> None:
        self._config = config
        self._clock = config.clock
        # Before LMDB touches a file: a second broker on this directory must change nothing (see _lock).
        self._lock = DirectoryLock(config.path).acquire()
        try:
            self._env = lmdb.open(
                str(config.path),
                map_size=config.map_size,
                max_dbs=6,  # msgs, state, meta, dedup, events, and a schema-2 store's history while it moves
                sync=config.durable,
                metasync=config.durable,
                readahead=False,
                max_readers=64,
                mode=FILE_MODE,
            )
        except BaseException:
            self._lock.release()
            raise
        changed = tighten_modes(config.path)
        if changed:
            log.warning("store_permissions_tightened", path=str(config.path), files=changed, mode="0600")
        if config.path.stat().st_mode & 0o077:
            log.warning("store_directory_not_private", path=str(config.path), hint="chmod 700 it")
        self._meta_db = self._env.open_db(b"meta")
        self._msgs_db = self._env.open_db(b"msgs")
        self._state_db = self._env.open_db(b"state")
        self._dedup_db = self._env.open_db(b"dedup")
        self._full = False  # at max_size: refuse publishes until deletes bring it back under
        self._unleased: list[Tracked] = []  # leases this batch ended, restored if its commit fails
        self._queues: dict[str, QueueState] = {}
        self._by_qnum: dict[int, QueueState] = {}  # every storage prefix (lanes, side) -> its queue
        self._owners: dict[int, set[Tracked]] = {}
        # (deadline, seq, queue qnum, ids leased together): one entry per fetch or touch, not per message.
        # Entries go stale when their messages are settled or re-leased; expiry checks each message's own
        # deadline. Ids, not the Tracked records: an acked record is freed at once instead of living on here
        # until its lease would have ended, which under load kept every message of the last lease period alive
        # and made the garbage collector walk them all.
        self._lease_heap: list[tuple[float, int, int, array[int]]] = []
        self._lease_seq = 0
        self._delay_heap: list[tuple[float, int, int]] = []  # (due unix s, storage qnum, id)
        # (expiry unix s, storage qnum, id) of tracked messages that are not leased and have a TTL (their own or
        # the queue's); entries go stale, checked on pop. Leased messages are checked when their lease ends.
        self._ttl_heap: list[tuple[float, int, int]] = []
        self._sweeps: list[tuple[float, int]] = []  # (unix s, queue qnum): message_ttl sweeps of lane fronts
        self._prunes: list[tuple[float, int]] = []  # (unix s, queue qnum): dedup entries to forget
        self._bindings = Bindings()
        self._token_seq = 0
        self._token_seq_stored = 0  # what LMDB holds: publishing alone need not rewrite it
        self._qnum_seq = 0
        # Per batch:
        self._writes = Writes()
        self._touched: dict[int, QueueState] = {}
        self._granted: dict[int, QueueState] = {}  # queues with more grants than they keep, by this batch
        self._readied: set[str] = set()
        self._rtxn: lmdb.Transaction | None = None

    # ----------------------------------------------------------------------------------------------- lookups
    def _read_txn(self) -> lmdb.Transaction:
        if self._rtxn is None:
            self._rtxn = self._env.begin(db=self._msgs_db)
        return self._rtxn

    def _queue(self, name: str) -> QueueState:
        q = self._queues.get(name)
        if q is None:
            raise StoreError(StoreCode.NOT_FOUND, f"queue {name!r} does not exist")
        return q

    def _new_qnum(self) -> int:
        # Never reused, so a deleted queue's stray keys can never alias a new queue or lane.
        self._qnum_seq += 1
        self._writes.meta[QNUM_SEQ] = str(self._qnum_seq).encode()
        return self._qnum_seq

    def _get_or_create(self, name: str, options: QueueOptions | None = None, *, limited: bool = True) -> QueueState:
        """The queue ``name``, created if missing; ``limited`` False creates it even past ``max_queues``."""
        q = self._queues.get(name)
        if q is None:
            max_queues = self._config.max_queues
            if limited and len(self._queues) >= max_queues:
                raise StoreError(
                    StoreCode.TOO_MANY_QUEUES,
                    f"cannot create queue {name!r}: the store holds {len(self._queues)} queues, its max_queues is "
                    f"{max_queues}",
                )
            q = QueueState(name, self._new_qnum(), 1, 0, 0, options or QueueOptions())
            self._queues[name] = q
            self._by_qnum[q.qnum] = q
            self._touched[q.qnum] = q
        return q

    def _lane(self, q: QueueState, prio: int) -> Lane:
        """The lane of priority ``prio`` of ``q``, given a storage prefix of its own when first used."""
        lane = q.lanes.get(prio)
        if lane is None:
            lane = Lane(prio, self._new_qnum(), q.next_id)
            lane.cursor = q.next_id  # nothing below is stored under its prefix
            q.add_lane(lane)
            self._by_qnum[lane.qnum] = q
            self._touched[q.qnum] = q
        return lane

    def _side(self, q: QueueState) -> int:
        """The storage prefix of ``q``'s messages published with a delay or a TTL of their own."""
        if not q.side:
            q.side = self._new_qnum()
            self._by_qnum[q.side] = q
            self._touched[q.qnum] = q
        return q.side

    # ----------------------------------------------------------------------------------------------- leases
    def _lease(self, q: QueueState, t: Tracked, deadline: float, owner: int) -> None:
        """Mark ``t`` leased; the caller registers its deadline with :meth:`_lease_group`."""
        q.set_status(t, LEASED)
        t.deadline = deadline
        t.owner = owner
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = set()
        owned.add(t)

    def _lease_group(self, deadline: float, q: QueueState, mids: Iterable[int]) -> None:
        self._lease_seq += 1
        heapq.heappush(self._lease_heap, (deadline, self._lease_seq, q.qnum, array("Q", mids)))

    def _unlease(self, t: Tracked) -> None:
        if t.status == LEASED:
            self._unleased.append(t)
            owned = self._owners.get(t.owner)
            if owned is not None:
                owned.discard(t)

    # ----------------------------------------------------------------------------------------------- reading
    def _fresh(self, q: QueueState, lane: Lane) -> Iterator[tuple[int, bytes | memoryview]]:
        """Never-delivered committed messages of ``lane`` in id order, from its cursor."""
        cur = self._read_txn().cursor()
        if not cur.set_range(pack_key(lane.qnum, lane.cursor)):
            return
        qnum, hi, tracked = lane.qnum, q.visible_hi, q.tracked
        for key, value in cur:
            kq, mid = unpack_key(key)
            if kq != qnum or mid >= hi:
                return
            if mid not in tracked:
                yield mid, value

    def _has_fresh(self, q: QueueState, lane: Lane) -> bool:
        """Whether ``lane`` may hold never-delivered committed messages (False is certain, True a hint)."""
        return lane.cursor < lane.last and lane.cursor < q.visible_hi

    def _walk(self, q: QueueState, lane: Lane) -> Iterator[Ready]:
        """The ready messages of ``lane`` in id order, for an operation that takes them.

        Before asking for the next one, the caller must take the one it was given out of the ready set: lease or
        remove it (and, for a never-delivered one, move the lane's cursor past it first; :meth:`_pin` keeps one in
        place). A record it leaves ready must be popped off the lane's heap, and pushed back after the walk.
        """
        txn = self._read_txn()
        tracked, hi = q.tracked, q.visible_hi
        fresh = self._fresh(q, lane) if self._has_fresh(q, lane) else iter(())
        nxt = next(fresh, None)
        while True:
            rid = lane.peek_ready(tracked)
            if rid is not None and rid >= hi:
                rid = None  # published by this batch, ready but not committed: next batch
            if rid is not None and (nxt is None or rid < nxt[0]):
                t = tracked[rid]
                stored = txn.get(pack_key(t.qnum, rid))
                if stored is None:  # cannot happen while the index mirrors LMDB; drop the phantom, loudly
                    heapq.heappop(lane.ready_heap)
                    log.error("tracked_message_missing", queue=q.name, id=rid)
                    q.untrack(rid)
                    q.bytes -= t.size  # the counters mirror what LMDB holds
                    q.count -= 1
                    self._writes.delete(self._state_db, pack_key(t.qnum, rid))
                    self._touched[q.qnum] = q
                    continue
                yield rid, stored, t
            elif nxt is not None:
                yield nxt[0], nxt[1], None
                nxt = next(fresh, None)
            else:
                # Every never-delivered message below visible_hi was handed out and taken: none is left there.
                lane.cursor = max(lane.cursor, hi)
                return

    def _view(self, q: QueueState, lane: Lane) -> Iterator[Ready]:
        """The ready messages of ``lane`` in id order, read without changing anything."""
        txn = self._read_txn()
        tracked, hi = q.tracked, q.visible_hi
        heap = [mid for mid in lane.ready_heap if mid < hi]
        heapq.heapify(heap)

        def records() -> Iterator[Ready]:
            seen: set[int] = set()
            while heap:
                mid = heapq.heappop(heap)
                t = tracked.get(mid)
                if mid in seen or t is None or t.status != READY:
                    continue
                seen.add(mid)
                value = txn.get(pack_key(t.qnum, mid))
                if value is not None:
                    yield mid, value, t

        fresh = ((mid, value, None) for mid, value in self._fresh(q, lane)) if self._has_fresh(q, lane) else ()
        return heapq.merge(records(), fresh, key=_first)

    def _published_at(self, t: Tracked) -> float | None:
        value = self._read_txn().get(pack_key(t.qnum, t.mid))
        return None if value is None else published_at_of(value)

    # ----------------------------------------------------------------------------------------------- changing
    def _pin(self, q: QueueState, lane: Lane, mid: int, size: int) -> Tracked:
        """Give never-delivered message ``mid`` a record (ready, no attempts yet), so that the lane's cursor may
        move past it while it stays where it is. The caller pushes it onto the heap once its walk is over."""
        t = Tracked(lane.qnum, mid, 0, 0, 0.0, READY, size, lane.prio)
        q.tracked[mid] = t
        q.n_ready += 1
        lane.cursor = mid + 1
        self._writes.put(self._state_db, pack_key(lane.qnum, mid), state_value(t))
        return t

    def _remove(self, q: QueueState, mid: int, qnum: int, size: int | None = None) -> None:
        """Delete message ``mid`` stored under prefix ``qnum`` (the general path; acks take a batched one). For a
        never-delivered one the caller has moved its lane's cursor past it (a fetch later in this batch reads
        committed data, where it is still present); ``size`` saves reading it."""
        key = pack_key(qnum, mid)
        t = q.tracked.get(mid)
        if t is not None:
            self._unlease(t)
            q.untrack(mid)
            size = t.size
            self._writes.delete(self._state_db, key)
        elif size is None:
            value = self._read_txn().get(key)
            size = len(value) - VALUE_HEAD_SIZE if value is not None else 0
        self._writes.delete(self._msgs_db, key)
        self._writes.deletes += 1
        q.bytes -= size
        q.count -= 1
        self._touched[q.qnum] = q

    def _append(
        self, q: QueueState, prio: int, published_at: float, payload: bytes, headers: dict[str, str] | None
    ) -> int:
        """Store one message at the end of lane ``prio`` of ``q`` whatever its limits (a move, not a publish)."""
        lane = self._lane(q, prio)
        mid = q.next_id
        q.next_id += 1
        lane.last = q.next_id
        q.count += 1
        value = encode_message(published_at, payload, headers)
        q.bytes += len(value) - VALUE_HEAD_SIZE
        self._writes.put(self._msgs_db, pack_key(lane.qnum, mid), value)
        self._touched[q.qnum] = q
        self._readied.add(q.name)
        if q.options.message_ttl:
            self._schedule_sweep(q, published_at + q.options.message_ttl)
        return mid

    def _dead_letter(
        self,
        q: QueueState,
        mid: int,
        qnum: int,
        reason: DeadLetterReason,
        prio: int,
        value: bytes | memoryview | None = None,
    ) -> None:
        """Move message ``mid`` (stored under ``qnum``; ``value`` if already read) to ``q``'s dead-letter queue."""
        if value is None:
            value = self._read_txn().get(pack_key(qnum, mid))
        t = q.tracked.get(mid)
        attempts = t.attempts if t is not None else 0
        self._remove(q, mid, qnum, len(value) - VALUE_HEAD_SIZE if value is not None else 0)
        q.counters.dead_lettered += 1
        if value is None:  # cannot happen while the index mirrors LMDB; never invent a payload
            log.error("dead_letter_missing_message", queue=q.name, id=mid)
            return
        published_at, payload, headers = decode_message(value)
        headers = dict(headers or {})
        headers.update(zip(DEAD_LETTER_HEADERS, (q.name, reason.value, str(mid), str(attempts)), strict=True))
        # Neither max_queues nor the DLQ's own limits may refuse it: the message would be lost.
        self._append(self._get_or_create(q.dead_letter, limited=False), prio, published_at, payload, headers)

    # ----------------------------------------------------------------------------------------------- TTL
    @staticmethod
    def _expired(q: QueueState, t: Tracked | None, published_at: float, now: float) -> bool:
        ttl = q.options.message_ttl
        return bool((t is not None and t.expires and t.expires <= now) or (ttl and published_at + ttl <= now))

    def _expire_message(self, q: QueueState, mid: int, qnum: int, prio: int, value: bytes | memoryview) -> None:
        """Message ``mid`` outlived its TTL: dead-letter it (reason ``expired``), or delete it when the queue says
        ``expired="drop"``. For a never-delivered one the caller has moved its lane's cursor past it."""
        if q.options.expired == "drop":
            self._remove(q, mid, qnum, len(value) - VALUE_HEAD_SIZE)
            q.counters.dropped += 1
        else:
            self._dead_letter(q, mid, qnum, DeadLetterReason.EXPIRED, prio, value)

    def _watch(self, q: QueueState, t: Tracked, published_at: float) -> None:
        """Register when ``t`` (ready or delayed now) expires, if it ever does."""
        when = t.expires or math.inf
        if q.options.message_ttl:
            when = min(when, published_at + q.options.message_ttl)
        if when != math.inf:
            heapq.heappush(self._ttl_heap, (when, t.qnum, t.mid))

    def _schedule_sweep(self, q: QueueState, when: float) -> None:
        """Sweep the fronts of ``q``'s lanes for expired messages at ``when`` (unix s), if not sooner already."""
        if not q.ttl_sweep or when < q.ttl_sweep:
            q.ttl_sweep = when
            heapq.heappush(self._sweeps, (when, q.qnum))


def _first(item: Ready) -> int:
    return item[0]
