"""The LMDB engine's in-memory index of one queue.

Only messages that have been delivered, delayed or given a TTL are *tracked* (an object each); a never-delivered
backlog costs no memory at all: it is the run of ids from a lane's ``cursor`` up to ``visible_hi`` in LMDB, read
with a cursor when fetched.

**Priorities** are *lanes*. Each priority in use (0-9) has its own storage key prefix, its own never-delivered run
and cursor, and its own heap of ready tracked messages; ids stay unique per queue (one ``next_id`` for all lanes),
so a message is named by its id alone. Priority 0's prefix is the queue's own number, so a queue that never uses
priorities is laid out exactly as before lanes existed. A fetch takes from the highest lane that has something
ready and, within a lane, the lowest id first, whether never delivered or back after a nack, an ended lease or a
delay: FIFO within a priority.

Messages published with a delay or a TTL of their own go under one more prefix, the queue's *side* storage, and are
tracked from their publish (their due time and expiry live in their state record); the lanes' never-delivered runs
therefore only ever hold messages that need nothing but their position. That keeps the invariant the cursors rely
on: every tracked message of a lane's prefix has an id below the lane's cursor, so removing a tracked message can
never leave a stale copy for a never-delivered scan (which reads committed data) to find within the same batch.

**Grants.** A fetch that hands out a run of never-delivered messages of lane 0 (the hot path of consuming a
backlog) writes no state record per message. It reserves one range of tokens, the message with id ``first + k``
getting token ``base + k`` (ids it skipped leave gaps), and records the range as a *grant* in the queue's meta
record, which the batch rewrites anyway. A restart rebuilds each delivery of a recorded grant from it: attempts 1,
that token. A queue keeps its last :data:`GRANTS_KEPT` grants; the batch that pushes one more out gives the
messages of the oldest that are still there (an ack usually removed them all already) a state record of their own.
"""

from __future__ import annotations

import enum
import heapq

from replika_server.store._dedup import DedupIndex
from replika_server.store.base import HistoryOptions, QueueOptions, QueueStats


class Status(enum.IntEnum):
    READY = 0
    LEASED = 1
    DELAYED = 2


# Plain module constants: looking up an enum member on its class costs a descriptor call on every hot-path test.
READY, LEASED, DELAYED = Status.READY, Status.LEASED, Status.DELAYED


class Tracked:
    """A message with a state record, or delivered by a grant: its attempts, current lease token and, while leased,
    who holds it."""

    __slots__ = (
        "attempts",
        "deadline",
        "due",
        "expires",
        "mid",
        "owner",
        "prio",
        "qnum",
        "recorded",
        "size",
        "status",
        "token",
    )

    def __init__(
        self,
        qnum: int,
        mid: int,
        attempts: int,
        token: int,
        due: float,
        status: Status,
        size: int,
        prio: int = 0,
        expires: float = 0.0,
        recorded: bool = True,
    ) -> None:
        # qnum (the storage prefix its key is under) and mid let lease groups and owner sets hold the object
        # itself, with no key tuple per lease.
        self.qnum = qnum
        self.mid = mid
        self.attempts = attempts
        self.token = token
        self.due = due  # unix seconds, 0.0 when not delayed
        self.deadline = 0.0  # monotonic seconds, meaningful while LEASED
        self.owner = 0
        self.status = status
        # Payload plus packed headers bytes (see QueueState.bytes): removing the message needs no LMDB read.
        self.size = size
        self.prio = prio
        self.expires = expires  # unix seconds of its own TTL's end, 0.0 when it has none
        # Whether it may have a state record (False: delivered by a grant and nothing written since): an ack
        # deletes only those, saving the state database a lookup per message that has none.
        self.recorded = recorded


#: Grants a queue's meta record keeps (see the module docstring): enough for a few fetches in flight on each of a
#: few consumers before their messages need records of their own.
GRANTS_KEPT = 8


class Grant:
    """First deliveries of one fetch: the ids ``first`` to ``last`` of lane 0 that were not tracked before it, the
    message with id ``m`` getting token ``base + m - first``."""

    __slots__ = ("base", "first", "last")

    def __init__(self, first: int, last: int, base: int) -> None:
        self.first = first
        self.last = last
        self.base = base


class Lane:
    """The messages of one priority: the never-delivered run under ``qnum`` and the ready tracked ones."""

    __slots__ = ("cursor", "last", "prio", "qnum", "ready_heap")

    def __init__(self, prio: int, qnum: int, last: int = 0) -> None:
        self.prio = prio
        self.qnum = qnum
        self.cursor = 1  # every never-delivered message of this lane has an id >= cursor
        # One past the highest id ever put under qnum as never delivered (a hint: cursor >= last means the run
        # is empty without reading LMDB; after a restart it is the queue's next_id until a scan finds out).
        self.last = last
        self.ready_heap: list[int] = []  # ids of READY tracked messages; entries may be stale, checked on pop

    def peek_ready(self, tracked: dict[int, Tracked]) -> int | None:
        """The lowest id of a READY tracked message of this lane, dropping stale heap entries."""
        heap = self.ready_heap
        while heap:
            mid = heap[0]
            t = tracked.get(mid)
            if t is not None and t.status == READY:
                return mid
            heapq.heappop(heap)
        return None


class QueueCounters:
    """What happened to one queue's messages: counted where it happens, so that every path (dead-lettering at
    fetch time, expiry, a closed connection) is counted once."""

    __slots__ = ("acked", "dead_lettered", "deduplicated", "delivered", "dropped", "expired", "nacked", "published")

    def __init__(self) -> None:
        self.published = 0  # messages stored by publish (dead-lettered and redriven arrivals are not publishes)
        self.delivered = 0  # deliveries: messages in fetch replies
        self.acked = 0
        self.nacked = 0
        self.expired = 0  # leases that ended at their deadline or with their connection, without a settle
        self.dead_lettered = 0  # messages moved out of this queue to its dead-letter queue
        self.dropped = 0  # messages deleted unacked: TTL ran out with expired="drop", or overflow="drop_oldest"
        self.deduplicated = 0  # published messages not stored: their dedup id was seen within the window

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class QueueState:
    """One queue: durable counters mirrored from its meta record, its lanes and the delivery index."""

    __slots__ = (
        "bindings",
        "bytes",
        "count",
        "counters",
        "dedup",
        "grants",
        "lane0",
        "lanes",
        "n_delayed",
        "n_leased",
        "n_ready",
        "name",
        "next_id",
        "options",
        "order",
        "qnum",
        "side",
        "tracked",
        "ttl_sweep",
        "visible_hi",
    )

    def __init__(self, name: str, qnum: int, next_id: int, count: int, size: int, options: QueueOptions) -> None:
        self.name = name
        self.qnum = qnum
        self.next_id = next_id  # next id to assign; ids start at 1
        self.count = count  # messages stored, whatever their status
        # Payload plus packed headers bytes of those messages: each stored value less its fixed head. Counted
        # the same way as max_bytes so that the limit does not depend on the record layout.
        self.bytes = size
        self.options = options
        # Ids below visible_hi are committed; a fetch never reads past it, so it never sees an uncommitted publish.
        self.visible_hi = next_id
        self.lane0 = Lane(0, qnum, next_id)
        self.lanes: dict[int, Lane] = {0: self.lane0}
        self.order: list[Lane] = [self.lane0]  # highest priority first
        self.side = 0  # storage prefix of messages published with a delay or TTL; 0 until first needed
        self.tracked: dict[int, Tracked] = {}
        # Events since this process opened the store (not persisted; Prometheus counters may reset on restart).
        self.counters = QueueCounters()
        self.n_ready = 0
        self.n_leased = 0
        self.n_delayed = 0
        self.dedup = DedupIndex()
        self.bindings: set[str] = set()
        self.ttl_sweep = 0.0  # unix s of the next message_ttl sweep of the lanes' fronts; 0: none scheduled
        self.grants: list[Grant] = []  # oldest first, at most GRANTS_KEPT once the batch that added one ends

    def add_lane(self, lane: Lane) -> None:
        self.lanes[lane.prio] = lane
        self.order = sorted(self.lanes.values(), key=lambda lane: -lane.prio)

    def storage(self) -> list[int]:
        """Every key prefix this queue's messages may be stored under."""
        return [lane.qnum for lane in self.order] + ([self.side] if self.side else [])

    @property
    def dead_letter(self) -> str:
        return self.options.dead_letter_of(self.name)

    def retry_delay(self, attempts: int) -> float:
        """Seconds before a message whose lease ended after ``attempts`` deliveries is ready again."""
        return self.options.retry_delay_after(attempts)

    def set_status(self, t: Tracked, status: Status) -> None:
        old = t.status
        if old == status:
            return
        if old == READY:
            self.n_ready -= 1
        elif old == LEASED:
            self.n_leased -= 1
        else:
            self.n_delayed -= 1
        if status == READY:
            self.n_ready += 1
        elif status == LEASED:
            self.n_leased += 1
        else:
            self.n_delayed += 1
        t.status = status

    def track(self, mid: int, t: Tracked) -> None:
        self.tracked[mid] = t
        if t.status == READY:
            self.n_ready += 1
            heapq.heappush(self.lanes[t.prio].ready_heap, mid)
        elif t.status == LEASED:
            self.n_leased += 1
        else:
            self.n_delayed += 1

    def untrack(self, mid: int) -> Tracked | None:
        t = self.tracked.pop(mid, None)
        if t is not None:
            if t.status == READY:
                self.n_ready -= 1
            elif t.status == LEASED:
                self.n_leased -= 1
            else:
                self.n_delayed -= 1
        return t

    def make_ready(self, mid: int, t: Tracked) -> None:
        self.set_status(t, READY)
        heapq.heappush(self.lanes[t.prio].ready_heap, mid)

    def limits(self, default_length: int | None, default_bytes: int | None) -> tuple[int | None, int | None]:
        """The (max_length, max_bytes) in force: the queue's own, else the store's default; None is unlimited."""
        return self.options.limits(default_length, default_bytes)

    def stats(self, default_length: int | None, default_bytes: int | None) -> QueueStats:
        """Counts and settings; the defaults are the store's, used where the queue's own limits are None."""
        fresh = self.count - len(self.tracked)
        max_length, max_bytes = self.limits(default_length, default_bytes)
        return QueueStats(
            name=self.name,
            ready=fresh + self.n_ready,
            in_flight=self.n_leased,
            delayed=self.n_delayed,
            total=self.count,
            max_attempts=self.options.max_attempts,
            dead_letter=self.dead_letter,
            bytes=self.bytes,
            max_length=max_length,
            max_bytes=max_bytes,
            counters=self.counters.as_dict(),
            options=self.options,
            bindings=sorted(self.bindings),
        )

    def meta(self) -> dict[str, object]:
        meta: dict[str, object] = {
            "qnum": self.qnum,
            "next_id": self.next_id,
            "count": self.count,
            "bytes": self.bytes,
            "max_attempts": self.options.max_attempts,
            "dead_letter": self.options.dead_letter,
            "max_length": self.options.max_length,
            "max_bytes": self.options.max_bytes,
        }
        # The newer settings only when they differ from the default: the record is rewritten by every batch
        # that touches the queue, so it stays as small as it was for queues that do not use them.
        default = _DEFAULT_OPTIONS
        for name in _NEWER_OPTIONS:
            value = getattr(self.options, name)
            if value != getattr(default, name):
                meta[name] = value
        h = self.options.history
        if h is not None:
            meta["history"] = [h.retention, h.max_messages, h.payloads]
        if self.grants:
            meta["grants"] = [[g.first, g.last, g.base] for g in self.grants]
        if len(self.lanes) > 1:
            meta["lanes"] = [[lane.prio, lane.qnum] for lane in self.order if lane.prio]  # pairs: str map keys only
        if self.side:
            meta["side"] = self.side
        return meta


_DEFAULT_OPTIONS = QueueOptions()
_NEWER_OPTIONS = (
    "overflow",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "message_ttl",
    "expired",
    "dedup_window",
)


def options_from_meta(meta: dict[str, object]) -> QueueOptions:
    """A queue's options from its meta record; settings absent from it (older records) take their defaults."""
    fields: dict[str, object] = {name: meta[name] for name in _NEWER_OPTIONS if name in meta}
    history = meta.get("history")
    if isinstance(history, list):
        fields["history"] = HistoryOptions(*history)
    return QueueOptions(
        meta["max_attempts"],  # type: ignore[arg-type]
        meta["dead_letter"],  # type: ignore[arg-type]
        meta.get("max_length"),  # type: ignore[arg-type]
        meta.get("max_bytes"),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )
