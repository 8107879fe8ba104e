"""The storage interface the broker talks to, and the operations it carries.

A store executes a *batch* of operations as one unit of group commit: every mutation in the batch lands in one
durable commit, and no result may be shown to a client before :meth:`Store.execute` returns. The interface is at the
level of queue semantics (append, lease, settle, expire, release), not of keys and values, so that an engine
whose indexes live elsewhere (PostgreSQL shared by several brokers) can implement it without the server changing.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from replika_protocol import ErrorCode

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_RETRY_BACKOFF",
    "MAX_RETRY_DELAY",
    "Ack",
    "BatchResult",
    "Bind",
    "DeadLetterReason",
    "Declare",
    "DeleteQueue",
    "Delivery",
    "Expire",
    "Fetch",
    "Nack",
    "Op",
    "Peek",
    "Peeked",
    "Publish",
    "PublishTopic",
    "Purge",
    "QueueOptions",
    "QueueStats",
    "Redrive",
    "Reject",
    "Release",
    "Settle",
    "Stats",
    "Store",
    "StoreError",
    "Touch",
    "Unbind",
]

#: Seconds a dedup id is remembered unless the queue says otherwise: long enough to cover a producer's retries
#: across a reconnect or a broker restart, short enough that the index stays small.
DEFAULT_DEDUP_WINDOW = 120.0
#: Factor by which the retry delay grows per attempt unless the queue says otherwise (exponential backoff).
DEFAULT_RETRY_BACKOFF = 2.0
#: Longest retry delay, in seconds (30 days, the longest nack delay), when the queue sets no retry_max_delay.
MAX_RETRY_DELAY = 30 * 86400.0

#: A delivered message: (id, lease token, attempts, published_at unix s, payload, headers or None).
#: A tuple, not an object, because it goes straight onto the wire as a msgpack array.
#: The payload is a memoryview (of bytes the store owns) when it is at least ``PASS_THROUGH`` bytes long.
Delivery = tuple[int, int, int, float, "bytes | memoryview", "dict[str, str] | None"]
#: A message read by :class:`Peek`, without a lease: (id, attempts, published_at unix s, payload, headers or None).
Peeked = tuple[int, int, float, bytes, "dict[str, str] | None"]


class StoreError(Exception):
    """An operation the store refused; ``code`` is the wire error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeadLetterReason(enum.StrEnum):
    """Why a message was moved to a dead-letter queue (its ``replika-dead-letter-reason`` header)."""

    MAX_ATTEMPTS = "max_attempts"
    REJECTED = "rejected"
    EXPIRED = "expired"  # its TTL (own or the queue's message_ttl) ran out before it was acked
    OVERFLOW = "overflow"  # pushed out by a publish to its full queue declared with overflow="dead_letter"


Overflow = Literal["reject", "drop_oldest", "dead_letter"]
Expired = Literal["dead_letter", "drop"]


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """Durable per-queue settings. Durations in seconds. ``max_attempts`` None means unlimited deliveries.

    ``max_length`` (messages) and ``max_bytes`` (payload plus packed headers bytes) bound what the queue holds,
    whatever the messages' status; None uses the store's default. What a publish that would pass either does is
    ``overflow``'s: ``reject`` refuses it whole with ``QUEUE_FULL``; ``drop_oldest`` deletes the oldest ready
    messages (lowest ids) to make room, ``dead_letter`` moves them to the dead-letter queue (reason ``overflow``);
    when the ready messages are not enough, the publish is refused with ``QUEUE_FULL`` all the same.

    A nack without a delay, or a lease that ends at its deadline or with its connection, makes the message ready
    after ``min(retry_delay * retry_backoff ** (attempts - 1), retry_max_delay)`` (0: at once). ``message_ttl``
    bounds every message's life from its publish; an expired message is never delivered, it is dead-lettered
    (reason ``expired``) or, with ``expired="drop"``, deleted. A publish repeating a dedup id seen less than
    ``dedup_window`` seconds before stores nothing (0: no deduplication).
    """

    max_attempts: int | None = None
    dead_letter: str | None = None  # None: "<queue>.dlq"
    max_length: int | None = None
    max_bytes: int | None = None
    overflow: Overflow = "reject"
    retry_delay: float = 0.0
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    retry_max_delay: float | None = None  # None: MAX_RETRY_DELAY
    message_ttl: float | None = None
    expired: Expired = "dead_letter"
    dedup_window: float = DEFAULT_DEDUP_WINDOW


@dataclass(slots=True)
class Declare:
    queue: str
    options: QueueOptions


@dataclass(slots=True)
class Publish:
    """Store ``payloads`` (and their ``headers``) in ``queue``, all with ``priority`` (0-9, higher first), ready
    after ``delay`` seconds, expiring ``ttl`` seconds after now (None: only the queue's message_ttl). ``dedup_ids``
    has one entry (a str or None) per payload."""

    queue: str
    payloads: list[bytes]
    headers: list[dict[str, str] | None] | None = None
    priority: int = 0
    delay: float = 0.0
    ttl: float | None = None
    dedup_ids: list[str | None] | None = None


@dataclass(slots=True)
class PublishTopic:
    """Publish one copy of the messages to every queue bound by a pattern matching ``topic``, in one commit and
    all-or-nothing. ``may_publish`` (when set) must allow every one of those queues, else ``FORBIDDEN``."""

    topic: str
    payloads: list[bytes]
    headers: list[dict[str, str] | None] | None = None
    priority: int = 0
    delay: float = 0.0
    ttl: float | None = None
    dedup_ids: list[str | None] | None = None
    may_publish: Callable[[str], bool] | None = None


@dataclass(slots=True)
class Bind:
    """Route topics matching ``pattern`` to ``queue`` (created if absent); binding twice is a no-op."""

    queue: str
    pattern: str


@dataclass(slots=True)
class Unbind:
    """Remove the binding of ``pattern`` to ``queue``; a binding that does not exist is a no-op."""

    queue: str
    pattern: str


@dataclass(slots=True)
class Fetch:
    queue: str
    max: int
    lease: float  # seconds
    owner: int  # who holds the leases (a connection); released together by Release(owner)
    max_bytes: int = 2**62  # stop before the deliveries' size passes this (one reply frame); at least one


@dataclass(slots=True)
class Settle:
    """Base of the operations that act on delivered messages by (id, token)."""

    queue: str
    leases: Iterable[Sequence[int]]  # (id, token) pairs, iterated once
    owner: int


@dataclass(slots=True)
class Ack(Settle):
    pass


@dataclass(slots=True)
class Nack(Settle):
    delay: float | None = None  # seconds before the message is ready again; None: the queue's retry delay
    unseen: bool = False  # handed back unprocessed by a client library: this delivery is not an attempt


@dataclass(slots=True)
class Reject(Settle):
    pass


@dataclass(slots=True)
class Touch(Settle):
    lease: float = 30.0  # seconds from now


@dataclass(slots=True)
class Purge:
    queue: str


@dataclass(slots=True)
class DeleteQueue:
    queue: str


@dataclass(slots=True)
class Release:
    """Every lease held by ``owner`` ends now, as if expired (its connection closed)."""

    owner: int


@dataclass(slots=True)
class Expire:
    """Leases whose deadline passed end; delayed messages whose due time passed become ready."""


@dataclass(slots=True)
class Peek:
    """Read up to ``max`` ready messages in delivery order without leasing them or changing anything."""

    queue: str
    max: int
    max_bytes: int = 2**62  # as Fetch.max_bytes: the peeked messages' size stops before this; at least one


@dataclass(slots=True)
class Redrive:
    """Move up to ``max`` ready messages of the dead-letter queue ``queue`` back: each to ``to`` if given, else to
    the queue named by its ``replika-dead-letter-queue`` header (messages without one stay). A moved message is a
    new message there, published now, with its payload and its headers less the ``replika-dead-letter-*`` ones."""

    queue: str
    to: str | None
    max: int


@dataclass(slots=True)
class Stats:
    queue: str | None  # None: every queue


Op = (
    Declare
    | Publish
    | Fetch
    | Ack
    | Nack
    | Reject
    | Touch
    | Purge
    | DeleteQueue
    | Release
    | Expire
    | Stats
    | Peek
    | Redrive
    | PublishTopic
    | Bind
    | Unbind
)


@dataclass(slots=True)
class QueueStats:
    """Counts for one queue. ``ready + in_flight + delayed == total``.

    ``bytes`` is the payload plus packed headers bytes of those ``total`` messages; ``max_length`` (messages) and
    ``max_bytes`` are the limits in force (the queue's own or the store's default), None when unlimited.
    """

    name: str
    ready: int
    in_flight: int
    delayed: int
    total: int
    max_attempts: int | None
    dead_letter: str
    bytes: int
    max_length: int | None
    max_bytes: int | None
    #: Events since the broker started: published, delivered, acked, nacked, expired (leases), dead_lettered,
    #: dropped (TTL or overflow deletions) and deduplicated (publishes answered with an earlier message's id).
    counters: dict[str, int] = field(default_factory=dict)
    options: QueueOptions = field(default_factory=QueueOptions)
    bindings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "queue": self.name,
            "ready": self.ready,
            "in_flight": self.in_flight,
            "delayed": self.delayed,
            "total": self.total,
            "max_attempts": self.max_attempts,
            "dead_letter": self.dead_letter,
            "bytes": self.bytes,
            "max_length": self.max_length,
            "max_bytes": self.max_bytes,
            "overflow": o.overflow,
            "retry_delay": o.retry_delay,
            "retry_backoff": o.retry_backoff,
            "retry_max_delay": o.retry_max_delay,
            "message_ttl": o.message_ttl,
            "expired": o.expired,
            "dedup_window": o.dedup_window,
            "bindings": self.bindings,
            "counters": self.counters,
        }


@dataclass(slots=True)
class BatchResult:
    """Per-op results, in op order, and the queues that gained ready messages (to wake long-polls)."""

    results: list[Any]
    readied: set[str] = field(default_factory=set)


class Store(abc.ABC):
    """A durable queue engine. Single caller: the broker's event loop."""

    @abc.abstractmethod
    async def execute(self, ops: Sequence[Op]) -> BatchResult:
        """Apply ``ops`` in order as one durable commit.

        Each entry of ``results`` is the op's value or a :class:`StoreError`: Publish -> (first_id, count),
        Fetch -> list[Delivery], Settle -> dict of id -> error code for the leases that failed (empty when all
        applied), Purge -> count removed, Stats -> list[QueueStats], Peek -> list[Peeked], Redrive -> count moved,
        PublishTopic -> dict of queue -> ids (one per payload), others -> None. A Publish with ``dedup_ids`` gives
        (first_id, count, ids): first_id and count describe the messages it stored, ids has one id per payload,
        an earlier message's for a repeat. Returns only after the
        commit is durable as the durability mode promises.
        """

    @abc.abstractmethod
    def next_timer(self) -> float | None:
        """Monotonic time at which an :class:`Expire` op next has work, or None."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish, flush and release the engine. No call may follow."""
