"""The storage interface the broker talks to, and the operations it carries (defined in :mod:`.model` and
:mod:`.ops`, re-exported here).

A store executes a *batch* of operations as one unit of group commit: every mutation in the batch lands in one
durable commit, and no result may be shown to a client before :meth:`Store.execute` returns. The interface is at the
level of queue semantics (append, lease, settle, expire, release), not of keys and values, so that an engine
whose indexes live elsewhere (PostgreSQL shared by several brokers) can implement it without the server changing.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from replika_server.store.model import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_HISTORY_MESSAGES,
    DEFAULT_HISTORY_RETENTION,
    DEFAULT_RETRY_BACKOFF,
    MAX_HISTORY_MESSAGES,
    MAX_HISTORY_RETENTION,
    MAX_QUEUE_NAME,
    MAX_RETRY_DELAY,
    TERMINAL,
    VIEW_THRESHOLD,
    DeadLetterReason,
    Delivery,
    EventKind,
    Expired,
    HistoryEvent,
    HistoryOptions,
    MessageHistory,
    Overflow,
    Peeked,
    Published,
    QueueOptions,
    QueueStats,
    Settled,
    StaleReason,
    StoreCode,
    StoreError,
    final_state,
    is_valid_pattern,
    is_valid_queue_name,
    overage,
    queue_full,
)
from replika_server.store.ops import (
    Ack,
    Bind,
    Declare,
    DeleteQueue,
    Expire,
    Fetch,
    History,
    HistoryList,
    Nack,
    Op,
    Operation,
    Peek,
    Publish,
    PublishTopic,
    Purge,
    Redrive,
    Reject,
    Release,
    Result,
    Settle,
    Stats,
    Touch,
    Unbind,
)

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_HISTORY_MESSAGES",
    "DEFAULT_HISTORY_RETENTION",
    "DEFAULT_RETRY_BACKOFF",
    "MAX_HISTORY_MESSAGES",
    "MAX_HISTORY_RETENTION",
    "MAX_QUEUE_NAME",
    "MAX_RETRY_DELAY",
    "SYSTEM_CLOCK",
    "TERMINAL",
    "VIEW_THRESHOLD",
    "Ack",
    "BackupError",
    "BackupResult",
    "BatchResult",
    "Bind",
    "Clock",
    "DeadLetterReason",
    "Declare",
    "DeleteQueue",
    "Delivery",
    "EventKind",
    "Expire",
    "Expired",
    "Fetch",
    "History",
    "HistoryEvent",
    "HistoryList",
    "HistoryOptions",
    "MessageHistory",
    "Nack",
    "Op",
    "Operation",
    "Overflow",
    "Peek",
    "Peeked",
    "Publish",
    "PublishTopic",
    "Published",
    "Purge",
    "QueueOptions",
    "QueueStats",
    "Redrive",
    "Reject",
    "Release",
    "Result",
    "Settle",
    "Settled",
    "StaleReason",
    "Stats",
    "Store",
    "StoreCode",
    "StoreError",
    "StoreExists",
    "StoreOptions",
    "Touch",
    "Unbind",
    "final_state",
    "is_valid_pattern",
    "is_valid_queue_name",
    "overage",
    "queue_full",
]


class Clock(Protocol):
    """Where the store reads the time: wall-clock unix seconds for what must survive a restart (due times, TTLs,
    published_at), monotonic seconds for lease deadlines. Tests pass a clock they advance by hand."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks (:func:`time.time`, :func:`time.monotonic`)."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Settings every engine honours. Sizes in bytes, durations in seconds.

    ``durable``: a batch is confirmed only once committed durably (fsync on LMDB); False is the relaxed mode,
    flushed every ``sync_interval``. ``max_size`` bounds what the store may hold (``STORE_FULL``).
    ``max_queues`` bounds the queues that Declare, Publish and Fetch may create (``TOO_MANY_QUEUES``); dead-letter
    queues created to receive a message are exempt, so they may take the count past it. ``default_max_length``
    (messages) and ``default_max_bytes`` (payload plus packed headers bytes) apply to every queue whose own
    :class:`QueueOptions` limit is None; None is unlimited.
    """

    durable: bool = True
    max_size: int = 64 * 1024**3
    sync_interval: float = 1.0
    # Each queue costs an index in memory and a meta record rewritten when touched; this stops a client that
    # publishes to ever new names from growing both without bound, while leaving room for any real deployment.
    max_queues: int = 10_000
    default_max_length: int | None = None
    default_max_bytes: int | None = None
    clock: Clock = SYSTEM_CLOCK


class BackupError(Exception):
    """A backup or restore could not be made; the message says why. Nothing is left at the destination."""


class StoreExists(BackupError):
    """A restore would replace a store that is there: a mistake unless asked for (``force``)."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    """A finished backup or restore: where, its size in bytes, and how long it took in seconds."""

    path: Path
    size: int
    seconds: float


@dataclass(slots=True)
class BatchResult:
    """Per-op results, in op order (each the op's result type or a :class:`StoreError`), and the queues that
    gained ready messages (to wake long-polls)."""

    results: list[Result | StoreError]
    readied: set[str] = field(default_factory=set)


class Store(abc.ABC):
    """A durable queue engine. Single caller: the broker's event loop. Open one with
    :func:`replika_server.store.open`."""

    #: The engine's name as a ``--store`` URL scheme ("lmdb", "postgresql").
    engine: str = ""
    #: Seconds between :class:`Expire` runs the broker makes whatever :meth:`next_timer` says (None: only when it
    #: says). An engine shared by several brokers sets it: another node's commit can create timer work (a lease
    #: of a node that died) that this one's :meth:`next_timer` cannot know of.
    poll_interval: float | None = None

    def on_readied(self, wake: Callable[[str], None]) -> None:
        """Have ``wake(queue)`` called when ``queue`` gains ready messages other than by this store's
        :meth:`execute` (another broker's commit on a shared engine). The default: it never happens."""
        del wake  # a store no other broker shares: its own batch results say what readied

    @abc.abstractmethod
    async def execute(self, ops: Sequence[Op]) -> BatchResult:
        """Apply ``ops`` in order as one durable commit, and return each op's result (the type its
        ``Operation[...]`` names) or the :class:`StoreError` it failed with, in op order.

        A Publish gives :class:`Published`; Fetch the deliveries; a settle op (Ack, Nack, Reject, Touch) the
        leases it refused, with why (empty when all applied); Purge the count removed; Stats the queues' stats;
        Peek the messages read; Redrive the count moved; PublishTopic queue -> ids (one per payload); the others
        None. Returns only after the commit is durable as the durability mode promises.
        """

    @property
    @abc.abstractmethod
    def clock(self) -> Clock:
        """The clock the store runs on (the broker arms its timers by it)."""

    @abc.abstractmethod
    def next_timer(self) -> float | None:
        """Time on :attr:`clock`'s monotonic scale at which an :class:`Expire` op next has work, or None."""

    @abc.abstractmethod
    def size_bytes(self) -> int:
        """Bytes the store takes on disk now (its data file, or its tables), for the admin views."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish, flush and release the engine. No call may follow."""
