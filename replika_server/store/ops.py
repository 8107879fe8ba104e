"""The operations a store executes in a batch (each an :class:`Operation` naming its result type), and the
unions of them and of their results. Re-exported by :mod:`replika_server.store.base`, the interface."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from replika_server.store.model import (
    Delivery,
    MessageHistory,
    Peeked,
    Published,
    QueueOptions,
    QueueStats,
    Settled,
)

__all__ = [
    "Ack",
    "Bind",
    "Declare",
    "DeleteQueue",
    "Expire",
    "Fetch",
    "History",
    "HistoryList",
    "Nack",
    "Op",
    "Operation",
    "Peek",
    "Publish",
    "PublishTopic",
    "Purge",
    "Redrive",
    "Reject",
    "Release",
    "Result",
    "Settle",
    "Stats",
    "Touch",
    "Unbind",
]

R = TypeVar("R", covariant=True)


class Operation(Generic[R]):
    """Base of the store's operations; ``R`` is the type of the op's result in :attr:`BatchResult.results`."""

    __slots__ = ()


@dataclass(slots=True)
class Declare(Operation[None]):
    queue: str
    options: QueueOptions


@dataclass(slots=True)
class Publish(Operation[Published]):
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
    owner: int = 0  # the publishing connection, for the history (0: none)
    by: str | None = None  # the publishing token's name or principal, for the history


@dataclass(slots=True)
class PublishTopic(Operation["dict[str, list[int]]"]):
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
class Bind(Operation[None]):
    """Route topics matching ``pattern`` to ``queue`` (created if absent); binding twice is a no-op."""

    queue: str
    pattern: str


@dataclass(slots=True)
class Unbind(Operation[None]):
    """Remove the binding of ``pattern`` to ``queue``; a binding that does not exist is a no-op."""

    queue: str
    pattern: str


@dataclass(slots=True)
class Fetch(Operation["list[Delivery]"]):
    queue: str
    max: int
    lease: float  # seconds
    owner: int  # who holds the leases (a connection); released together by Release(owner)
    max_bytes: int = 2**62  # stop before the deliveries' size passes this (one reply frame); at least one


@dataclass(slots=True)
class Settle(Operation[Settled]):
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
class Purge(Operation[int]):
    queue: str


@dataclass(slots=True)
class DeleteQueue(Operation[None]):
    queue: str


@dataclass(slots=True)
class Release(Operation[None]):
    """Every lease held by ``owner`` ends now, as if expired (its connection closed)."""

    owner: int


@dataclass(slots=True)
class Expire(Operation[None]):
    """Leases whose deadline passed end; delayed messages whose due time passed become ready."""


@dataclass(slots=True)
class Peek(Operation["list[Peeked]"]):
    """Read up to ``max`` ready messages in delivery order without leasing them or changing anything."""

    queue: str
    max: int
    max_bytes: int = 2**62  # as Fetch.max_bytes: the peeked messages' size stops before this; at least one


@dataclass(slots=True)
class Redrive(Operation[int]):
    """Move up to ``max`` ready messages of the dead-letter queue ``queue`` back: each to ``to`` if given, else to
    the queue named by its ``replika-dead-letter-queue`` header (messages without one stay). A moved message is a
    new message there, published now, with its payload and its headers less the ``replika-dead-letter-*`` ones."""

    queue: str
    to: str | None
    max: int


@dataclass(slots=True)
class Stats(Operation["list[QueueStats]"]):
    queue: str | None  # None: every queue


@dataclass(slots=True)
class History(Operation[MessageHistory]):
    """The recorded life of message ``id`` of ``queue`` (``NOT_FOUND`` if none is kept), from the last commit."""

    queue: str
    id: int


@dataclass(slots=True)
class HistoryList(Operation["list[MessageHistory]"]):
    """Up to ``max`` messages of ``queue`` with a recorded history, newest first: those whose final state is
    ``state`` (if given), published within [``since``, ``until``] (unix s, if given) and carrying the header
    ``header`` = (name, value) (if given)."""

    queue: str
    max: int = 100
    state: str | None = None
    since: float | None = None
    until: float | None = None
    header: tuple[str, str] | None = None


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
    | History
    | HistoryList
)


#: What an op gives: see each op's ``Operation[...]``.
Result = (
    None
    | Published
    | Settled
    | int
    | list[QueueStats]
    | list[Delivery]
    | list[Peeked]
    | dict[str, list[int]]
    | MessageHistory
    | list[MessageHistory]
)
