"""The storage interface the broker talks to, and the operations it carries.

A store executes a *batch* of operations as one unit of group commit: every mutation in the batch lands in one
durable commit, and no result may be shown to a client before :meth:`Store.execute` returns. The interface is at the
level of queue semantics (append, lease, settle, expire, release), not of keys and values, so that an engine
whose indexes live elsewhere (PostgreSQL shared by several brokers) can implement it without the server changing.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from replika_protocol import ErrorCode

__all__ = [
    "Ack",
    "BatchResult",
    "DeadLetterReason",
    "Declare",
    "DeleteQueue",
    "Delivery",
    "Expire",
    "Fetch",
    "Nack",
    "Op",
    "Publish",
    "Purge",
    "QueueOptions",
    "QueueStats",
    "Reject",
    "Release",
    "Settle",
    "Stats",
    "Store",
    "StoreError",
    "Touch",
]

#: A delivered message: (id, lease token, attempts, published_at unix s, payload, headers or None).
#: A tuple, not an object, because it goes straight onto the wire as a msgpack array.
Delivery = tuple[int, int, int, float, bytes, "dict[str, str] | None"]


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


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """Durable per-queue settings. ``max_attempts`` None means unlimited deliveries.

    ``max_length`` (messages) and ``max_bytes`` (payload plus packed headers bytes) bound what the queue holds,
    whatever the messages' status; a publish that would pass either is refused whole with ``QUEUE_FULL``. None uses
    the store's default.
    """

    max_attempts: int | None = None
    dead_letter: str | None = None  # None: "<queue>.dlq"
    max_length: int | None = None
    max_bytes: int | None = None


@dataclass(slots=True)
class Declare:
    queue: str
    options: QueueOptions


@dataclass(slots=True)
class Publish:
    queue: str
    payloads: list[bytes]
    headers: list[dict[str, str] | None] | None = None


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
    delay: float = 0.0  # seconds before the message is ready again
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
class Stats:
    queue: str | None  # None: every queue


Op = Declare | Publish | Fetch | Ack | Nack | Reject | Touch | Purge | DeleteQueue | Release | Expire | Stats


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
    #: Events since the broker started: published, delivered, acked, nacked, expired, dead_lettered.
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
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
        applied), Purge -> count removed, Stats -> list[QueueStats], others -> None. Returns only after the
        commit is durable as the durability mode promises.
        """

    @abc.abstractmethod
    def next_timer(self) -> float | None:
        """Monotonic time at which an :class:`Expire` op next has work, or None."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish, flush and release the engine. No call may follow."""
