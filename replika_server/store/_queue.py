"""The LMDB engine's in-memory index of one queue.

Only messages that have been delivered or delayed are *tracked* (an object each); a never-delivered backlog costs
no memory at all: it is the run of ids from ``cursor`` up to ``visible_hi`` in LMDB, read with a cursor when
fetched. Ready tracked messages (nacked, expired, recovered) wait in a min-heap of ids so that delivery stays FIFO
by id across both kinds.
"""

from __future__ import annotations

import enum
import heapq

from replika_protocol import MAX_QUEUE_NAME
from replika_server.store.base import QueueOptions, QueueStats


class Status(enum.IntEnum):
    READY = 0
    LEASED = 1
    DELAYED = 2


# Plain module constants: looking up an enum member on its class costs a descriptor call on every hot-path test.
READY, LEASED, DELAYED = Status.READY, Status.LEASED, Status.DELAYED


class Tracked:
    """A message with a state record: its attempts, current lease token and, while leased, who holds it."""

    __slots__ = ("attempts", "deadline", "due", "mid", "owner", "qnum", "size", "status", "token")

    def __init__(self, qnum: int, mid: int, attempts: int, token: int, due: float, status: Status, size: int) -> None:
        # qnum and mid let lease groups and owner sets hold the object itself, with no key tuple per lease.
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


class QueueCounters:
    """What happened to one queue's messages: counted where it happens, so that every path (dead-lettering at
    fetch time, expiry, a closed connection) is counted once."""

    __slots__ = ("acked", "dead_lettered", "delivered", "expired", "nacked", "published")

    def __init__(self) -> None:
        self.published = 0  # messages stored by publish (dead-lettered arrivals are not publishes)
        self.delivered = 0  # deliveries: messages in fetch replies
        self.acked = 0
        self.nacked = 0
        self.expired = 0  # leases that ended at their deadline or with their connection, without a settle
        self.dead_lettered = 0  # messages moved out of this queue to its dead-letter queue

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class QueueState:
    """One queue: durable counters mirrored from its meta record, and the delivery index."""

    __slots__ = (
        "bytes",
        "count",
        "counters",
        "cursor",
        "n_delayed",
        "n_leased",
        "n_ready",
        "name",
        "next_id",
        "options",
        "qnum",
        "ready_heap",
        "tracked",
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
        self.cursor = 1  # every never-delivered message has an id >= cursor
        self.tracked: dict[int, Tracked] = {}
        self.ready_heap: list[int] = []  # ids of READY tracked messages; entries may be stale, checked on pop
        # Events since this process opened the store (not persisted; Prometheus counters may reset on restart).
        self.counters = QueueCounters()
        self.n_ready = 0
        self.n_leased = 0
        self.n_delayed = 0

    @property
    def dead_letter(self) -> str:
        # Truncated so that the default stays a valid queue name a client can address.
        if self.options.dead_letter:
            return self.options.dead_letter
        name = f"{self.name[: MAX_QUEUE_NAME - 4]}.dlq"
        return name if name != self.name else f"{self.name[: MAX_QUEUE_NAME - 5]}_.dlq"  # never its own DLQ

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
            heapq.heappush(self.ready_heap, mid)
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
        heapq.heappush(self.ready_heap, mid)

    def peek_ready(self) -> int | None:
        """The lowest id of a READY tracked message, dropping stale heap entries."""
        heap = self.ready_heap
        tracked = self.tracked
        while heap:
            mid = heap[0]
            t = tracked.get(mid)
            if t is not None and t.status == READY:
                return mid
            heapq.heappop(heap)
        return None

    def limits(self, default_length: int | None, default_bytes: int | None) -> tuple[int | None, int | None]:
        """The (max_length, max_bytes) in force: the queue's own, else the store's default; None is unlimited."""
        max_length, max_bytes = self.options.max_length, self.options.max_bytes
        return (
            default_length if max_length is None else max_length,
            default_bytes if max_bytes is None else max_bytes,
        )

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
        )

    def meta(self) -> dict[str, object]:
        return {
            "qnum": self.qnum,
            "next_id": self.next_id,
            "count": self.count,
            "bytes": self.bytes,
            "max_attempts": self.options.max_attempts,
            "dead_letter": self.options.dead_letter,
            "max_length": self.options.max_length,
            "max_bytes": self.options.max_bytes,
        }
