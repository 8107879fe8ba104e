"""The values of the storage interface: names, codes and errors, queue options and stats, what ops give back,
and the model of a message's history. Engine-neutral, and importing nothing of the project (re-exported by
:mod:`replika_server.store.base`, the interface)."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_HISTORY_MESSAGES",
    "DEFAULT_HISTORY_RETENTION",
    "DEFAULT_RETRY_BACKOFF",
    "MAX_HISTORY_MESSAGES",
    "MAX_HISTORY_RETENTION",
    "MAX_QUEUE_NAME",
    "MAX_RETRY_DELAY",
    "TERMINAL",
    "VIEW_THRESHOLD",
    "DeadLetterReason",
    "Delivery",
    "EventKind",
    "Expired",
    "HistoryEvent",
    "HistoryOptions",
    "MessageHistory",
    "Overflow",
    "Peeked",
    "Published",
    "QueueOptions",
    "QueueStats",
    "Settled",
    "StaleReason",
    "StoreCode",
    "StoreError",
    "final_state",
    "is_valid_pattern",
    "is_valid_queue_name",
    "overage",
    "queue_full",
]

#: Seconds a dedup id is remembered unless the queue says otherwise: long enough to cover a producer's retries
#: across a reconnect or a broker restart, short enough that the index stays small.
DEFAULT_DEDUP_WINDOW = 120.0
#: Factor by which the retry delay grows per attempt unless the queue says otherwise (exponential backoff).
DEFAULT_RETRY_BACKOFF = 2.0
#: Longest retry delay, in seconds (30 days, the longest nack delay), when the queue sets no retry_max_delay.
MAX_RETRY_DELAY = 30 * 86400.0


_PATTERN = re.compile(r"[A-Za-z0-9._:*#-]{1,255}")


def is_valid_pattern(pattern: object) -> bool:
    """True for a binding pattern: 1-255 characters of ``[A-Za-z0-9._:-]`` and the wildcards ``*`` (one word) and
    ``#`` (zero or more words), each a whole dot-separated word."""
    if not isinstance(pattern, str) or _PATTERN.fullmatch(pattern) is None:
        return False
    return all(word in ("*", "#") or ("*" not in word and "#" not in word) for word in pattern.split("."))


#: A delivered message: (id, lease token, attempts, published_at unix s, payload, headers or None).
#: A tuple, not an object, because it goes straight onto the wire as a msgpack array.
#: The payload is a memoryview (of bytes the store owns) when it is at least ``VIEW_THRESHOLD`` bytes long.
Delivery = tuple[int, int, int, float, "bytes | memoryview", "dict[str, str] | None"]
#: A message read by :class:`Peek`, without a lease: (id, attempts, published_at unix s, payload, headers or None).
Peeked = tuple[int, int, float, bytes, "dict[str, str] | None"]


#: Longest queue name, in characters, and the names a queue may have: the wire protocol's rule (SPEC.md §5), kept
#: here too because the store depends on no other layer; a test checks that the two agree.
MAX_QUEUE_NAME = 255
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,255}")
#: Payloads of at least this many bytes are handed out as views of what the store read (no copy); the framing
#: passes such views to the socket uncopied (replika_protocol.framing.PASS_THROUGH, the same value).
VIEW_THRESHOLD = 65536


def is_valid_queue_name(name: object) -> bool:
    """True when ``name`` is a str of 1-255 characters from ``[A-Za-z0-9._:-]``."""
    return isinstance(name, str) and _QUEUE_NAME.fullmatch(name) is not None


class StoreCode(enum.StrEnum):
    """Why the store refused an op: the same strings as the wire protocol's error codes (SPEC.md §6), which the
    server turns them into."""

    BAD_REQUEST = "BAD_REQUEST"
    NOT_FOUND = "NOT_FOUND"
    FORBIDDEN = "FORBIDDEN"
    QUEUE_FULL = "QUEUE_FULL"
    TOO_MANY_QUEUES = "TOO_MANY_QUEUES"
    STORE_FULL = "STORE_FULL"
    STORE_FAILED = "STORE_FAILED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"


class StoreError(Exception):
    """An operation the store refused; ``code`` says why (a wire error code's string)."""

    def __init__(self, code: StoreCode, message: str) -> None:
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

#: Seconds a finished message's history is kept unless the queue says otherwise (7 days), and the longest allowed.
DEFAULT_HISTORY_RETENTION = 7 * 86400.0
MAX_HISTORY_RETENTION = 90 * 86400.0
#: Messages whose history a queue keeps unless it says otherwise, and the most it may keep: the oldest go first.
DEFAULT_HISTORY_MESSAGES = 100_000
MAX_HISTORY_MESSAGES = 10_000_000


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """A queue's message history (SPEC.md §5 declare). ``retention``: seconds a message's history is kept after
    the message left the queue (acked, dead-lettered, expired, dropped, purged, redriven); ``max_messages``: the
    most messages whose history is kept, the oldest deleted first whatever their state; ``payloads``: whether the
    published event keeps the payload (readable after the ack), else only the headers."""

    retention: float = DEFAULT_HISTORY_RETENTION
    max_messages: int = DEFAULT_HISTORY_MESSAGES
    payloads: bool = False


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
    history: HistoryOptions | None = None  # None: no history is recorded

    def dead_letter_of(self, queue: str) -> str:
        """The dead-letter queue of ``queue`` under these options: ``dead_letter``, else ``<queue>.dlq``,
        truncated so that it stays a valid name a client can address, and never ``queue`` itself."""
        if self.dead_letter:
            return self.dead_letter
        name = f"{queue[: MAX_QUEUE_NAME - 4]}.dlq"
        return name if name != queue else f"{queue[: MAX_QUEUE_NAME - 5]}_.dlq"

    def retry_delay_after(self, attempts: int) -> float:
        """Seconds before a message whose lease ended after ``attempts`` deliveries is ready again."""
        if not self.retry_delay:
            return 0.0
        cap = MAX_RETRY_DELAY if self.retry_max_delay is None else self.retry_max_delay
        try:
            delay = self.retry_delay * self.retry_backoff ** max(attempts - 1, 0)
        except OverflowError:  # a large factor to a large power: the cap, whatever it is
            return cap
        return min(delay, cap)

    def limits(self, default_length: int | None, default_bytes: int | None) -> tuple[int | None, int | None]:
        """The (max_length, max_bytes) in force: these options' own, else the store's default; None: unlimited."""
        return (
            default_length if self.max_length is None else self.max_length,
            default_bytes if self.max_bytes is None else self.max_bytes,
        )


def overage(held: tuple[int, int], limits: tuple[int | None, int | None], more: tuple[int, int]) -> tuple[int, int]:
    """How far ``more`` (messages, bytes) would take a queue holding ``held`` past ``limits`` (max_length,
    max_bytes; None: unlimited): (messages, bytes) over, each at most 0 when within."""
    (count, size), (max_length, max_bytes), (n, added) = held, limits, more
    return (
        count + n - max_length if max_length is not None else 0,
        size + added - max_bytes if max_bytes is not None else 0,
    )


def queue_full(
    name: str, held: tuple[int, int], limits: tuple[int | None, int | None], more: tuple[int, int], why: str
) -> StoreError:
    """``QUEUE_FULL`` for queue ``name`` holding ``held`` (messages, bytes) under ``limits`` (max_length,
    max_bytes), which ``more`` (messages, bytes) would pass; ``why`` adds the reason room could not be made."""
    (count, size), (max_length, max_bytes), (n, added) = held, limits, more
    if max_length is not None and count + n > max_length:
        message = (
            f"queue {name!r} is full: it holds {count} messages, its max_length is {max_length}; {n} more do not "
            f"fit{why}"
        )
    else:
        message = (
            f"queue {name!r} is full: it holds {size} bytes, its max_bytes is {max_bytes}; {added} more do not fit{why}"
        )
    return StoreError(StoreCode.QUEUE_FULL, message)


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
            "history": None if o.history is None else _history_dict(o.history),
            "bindings": self.bindings,
            "counters": self.counters,
        }


@dataclass(frozen=True, slots=True)
class Published:
    """What a Publish stored: ``count`` new messages with consecutive ids from ``first_id``. With dedup ids,
    ``ids`` has one id per payload (an earlier message's for a repeat); else None."""

    first_id: int
    count: int
    ids: list[int] | None = None


class StaleReason(enum.StrEnum):
    """Why a settle op refused a lease (``STALE_LEASE``): what the store knows of that (id, token)."""

    GONE = "gone"  # the message is no longer in the queue: already acked, or dead-lettered, expired or purged
    REDELIVERED = "redelivered"  # the message was delivered again since: this token is an earlier delivery's
    SETTLED = "settled"  # this delivery was already settled by a nack; the message waits to be delivered again
    UNKNOWN = "unknown"  # this token was never issued for this message


#: A settle op's refused leases: id -> why; empty when every lease applied.
Settled = dict[int, StaleReason]


class EventKind(enum.StrEnum):
    """What happened to a message, as its history records it (SPEC.md §5 history)."""

    PUBLISHED = "published"  # by: token or principal; connection; from/id/reason when moved here
    DELIVERED = "delivered"  # attempt, connection
    TOUCHED = "touched"  # connection, lease (s)
    NACKED = "nacked"  # connection, delay (s, None: the queue's retry delay)
    LEASE_EXPIRED = "lease_expired"  # connection, closed (the connection ended rather than the deadline)
    DEAD_LETTERED = "dead_lettered"  # reason, to, id (in the dead-letter queue)
    REDRIVEN = "redriven"  # to, id (in that queue)
    EXPIRED = "expired"  # its TTL ran out and the queue drops expired messages
    DROPPED = "dropped"  # reason overflow
    PURGED = "purged"
    ACKED = "acked"  # connection


#: Events after which the message is no longer in its queue.
TERMINAL = frozenset(
    {
        EventKind.ACKED,
        EventKind.DEAD_LETTERED,
        EventKind.REDRIVEN,
        EventKind.EXPIRED,
        EventKind.DROPPED,
        EventKind.PURGED,
    }
)


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One recorded event: when (unix s), what, the delivery attempt it concerns (0: none), the connection that
    caused it (0: none, the broker itself) and what else that kind says (see :class:`EventKind`)."""

    at: float
    kind: EventKind
    attempt: int = 0
    connection: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind.value,
            "attempt": self.attempt,
            "connection": self.connection,
            **self.detail,
        }


def final_state(events: Sequence[HistoryEvent]) -> str:
    """Where a message stands after ``events``: an ended one's last event (``acked``, ``dead_lettered``, ...),
    else ``in_flight`` (delivered or touched last) or ``waiting`` (ready or delayed)."""
    if not events:
        return "unknown"
    last = events[-1].kind
    if last in TERMINAL:
        return last.value
    return "in_flight" if last in (EventKind.DELIVERED, EventKind.TOUCHED) else "waiting"


@dataclass(frozen=True, slots=True)
class MessageHistory:
    """A message's recorded life, oldest event first; ``payload`` only when the queue keeps payloads."""

    queue: str
    id: int
    events: list[HistoryEvent]
    headers: dict[str, str] | None = None
    payload: bytes | None = None

    @property
    def state(self) -> str:
        return final_state(self.events)

    @property
    def published_at(self) -> float:
        return self.events[0].at if self.events else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.id,
            "state": self.state,
            "published_at": self.published_at,
            "headers": self.headers,
            "payload": self.payload,
            "events": [e.as_dict() for e in self.events],
        }


def _history_dict(h: HistoryOptions) -> dict[str, Any]:
    return {"retention": h.retention, "max_messages": h.max_messages, "payloads": h.payloads}
