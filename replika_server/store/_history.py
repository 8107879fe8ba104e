"""Message history in the LMDB engine: each message's lifecycle events, recorded in the commit that makes them.

Only queues declared with ``history`` record anything. An event record is a key of the ``events`` database,
``queue qnum (u32) + event sequence (u64)``, whose value is a head, msgpack ``[at, kind, attempt, connection,
detail or nil]`` after its length (u32), then the ids of the messages it happened to (u64 each, little-endian).
The sequence is store-wide and persisted in ``meta``, so a queue's records are appended in order (the commit
writes new pages at the end of the queue's range, not into pages written before), and one record holds the
events of a batch that differ only by message (the publish of a batch without headers, its delivery, its ack):
that was most of what history cost W2. The records go into the batch's write log like every other write, so
they are durable exactly when the change they describe is.

What a message's events are is kept in memory, per queue: its ids in first-event order, each with the sequences
of its records, the records of several messages (to rewrite them when one of those messages' history goes), and
when each ended message ended. All of it is rebuilt from the database on open. Retention:
:meth:`Historian._prune_history` (run by the Expire timer) deletes the history of messages that ended more than
``retention`` seconds ago, and recording past ``max_messages`` deletes the oldest messages'. Only a published
event starts a message's history: one already in the queue when history was turned on, or whose history was
pruned, records nothing more.

Stores of schema 2 kept one record per event under ``queue + message id + sequence`` in a ``history``
database; :func:`migrate_history` moves them on open.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

import lmdb
import msgpack

from replika_server.store._engine import EngineCore, LmdbConfig
from replika_server.store._queue import QueueState
from replika_server.store._records import QNUM, decode_message, pack_key, unpack_key
from replika_server.store.base import (
    TERMINAL,
    DeadLetterReason,
    EventKind,
    History,
    HistoryEvent,
    HistoryList,
    MessageHistory,
    Publish,
    StoreCode,
    StoreError,
)

__all__ = ["HISTORY_SEQ", "LIST_SCAN", "Historian", "matches", "migrate_history"]

HISTORY_SEQ = b"history_seq"
_RECORD_KEY = struct.Struct(">IQ")  # queue qnum, record sequence: a queue's records in the order they happened
_HEAD_SIZE = struct.Struct(">I")
_OLD_KEY = struct.Struct(">IQQ")  # schema 2: queue qnum, message id, event sequence
_MID = struct.Struct("<Q")
_KINDS = {kind.value: kind for kind in EventKind}
_TERMINAL = frozenset(kind.value for kind in TERMINAL)
#: Most messages one HistoryList reads before it answers with what it found (a filter that matches little must
#: not read the whole history in one batch).
LIST_SCAN = 10_000

_Detail = dict[str, Any] | None


class _Index:
    """What one queue has history of; see the module docstring."""

    __slots__ = ("ended", "ids", "shared")

    def __init__(self) -> None:
        #: message id -> the sequences of its records, oldest first; ids in first-event (publish) order
        self.ids: OrderedDict[int, list[int]] = OrderedDict()
        #: sequence -> (packed head, ids) of each record of more than one message
        self.shared: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        #: (ended unix s, ids), in the order they ended
        self.ended: deque[tuple[float, tuple[int, ...]]] = deque()


def _record_value(head: bytes, mids: Sequence[int]) -> bytes:
    return _HEAD_SIZE.pack(len(head)) + head + struct.pack(f"<{len(mids)}Q", *mids)


def _split_record(value: bytes | memoryview) -> tuple[memoryview, tuple[int, ...]]:
    """A record's packed head and the ids of its messages."""
    view = memoryview(value)
    (size,) = _HEAD_SIZE.unpack_from(view)
    start = _HEAD_SIZE.size + size
    return view[_HEAD_SIZE.size : start], struct.unpack_from(f"<{(len(view) - start) // 8}Q", view, start)


def migrate_history(env: lmdb.Environment, txn: lmdb.Transaction, events_db: Any) -> int:
    """Move a schema-2 store's ``history`` database into ``events`` (one record per event, as it was stored),
    inside ``txn``, and drop it; the number of events moved."""
    try:
        old = env.open_db(b"history", txn=txn, create=False)
    except lmdb.NotFoundError:
        return 0
    moved = 0
    put = txn.cursor(db=events_db).put
    for key, value in txn.cursor(db=old):
        qnum, mid, seq = _OLD_KEY.unpack(key)
        put(_RECORD_KEY.pack(qnum, seq), _record_value(bytes(value), (mid,)))
        moved += 1
    txn.drop(old, delete=True)
    return moved


class Historian(EngineCore):
    """Recording, pruning and reading message history; see the module docstring."""

    def __init__(self, config: LmdbConfig) -> None:
        super().__init__(config)
        self._events_db = self._env.open_db(b"events")
        self._history_seq = 0
        self._histories: dict[int, _Index] = {}  # queue qnum -> its index
        self._history_timers: list[tuple[float, int]] = []  # (unix s, queue qnum): history to prune then

    # ----------------------------------------------------------------------------------------------- recording
    def _record(
        self, q: QueueState, mid: int, kind: EventKind, attempt: int = 0, connection: int = 0, **detail: Any
    ) -> None:
        """Log event ``kind`` of message ``mid`` of ``q`` in this batch, if ``q`` keeps history."""
        self._record_alike(q, kind, (mid,), attempt, connection, detail or None)

    def _record_many(self, q: QueueState, kind: EventKind, events: Iterable[tuple[int, int, int, _Detail]]) -> None:
        """Events ``kind`` of ``q``, (id, attempt, connection, detail) each: one record for each run of events
        with the same attempt, connection and detail (the very same object: a publish's headers are its own)."""
        if q.options.history is None:
            return
        groups: dict[tuple[int, int, int], tuple[_Detail, list[int]]] = {}
        for mid, attempt, connection, detail in events:
            # The group holds its detail, so the id() in its key cannot be reused by another while it lives.
            group = groups.get((attempt, connection, id(detail)))
            if group is None:
                group = groups[attempt, connection, id(detail)] = (detail, [])
            group[1].append(mid)
        for (attempt, connection, _), (detail, mids) in groups.items():
            self._record_alike(q, kind, mids, attempt, connection, detail)

    def _record_alike(
        self,
        q: QueueState,
        kind: EventKind,
        mids: Iterable[int],
        attempt: int = 0,
        connection: int = 0,
        detail: _Detail = None,
    ) -> None:
        """Events ``kind`` of the messages ``mids`` of ``q`` that differ only by message, as one record."""
        h = q.options.history
        if h is None:
            return
        index = self._histories.get(q.qnum)
        if index is None:
            index = self._histories[q.qnum] = _Index()
        ids = index.ids
        published = kind is EventKind.PUBLISHED
        # A life is recorded from its publish: none before history was on, none after it was pruned.
        mids = tuple(mids) if published else tuple(mid for mid in mids if mid in ids)
        if not mids:
            return
        now = self._clock.time()
        head = msgpack.packb([now, kind.value, attempt, connection, detail], use_bin_type=True)
        self._history_seq += 1
        seq = self._history_seq
        self._writes.put(self._events_db, _RECORD_KEY.pack(q.qnum, seq), _record_value(head, mids))
        self._writes.meta[HISTORY_SEQ] = str(seq).encode()
        if len(mids) > 1:
            index.shared[seq] = (head, mids)
        if published:
            ids.update([(mid, [seq]) for mid in mids])
            excess = len(ids) - h.max_messages
            if excess > 0:
                self._drop(q.qnum, index, list(itertools.islice(ids, excess)))
        else:
            # list.append over the ids' lists, in C: this runs for every delivered and acked message.
            deque(map(list.append, map(ids.__getitem__, mids), itertools.repeat(seq)), maxlen=0)
        if kind in TERMINAL:
            index.ended.append((now, mids))
            heapq.heappush(self._history_timers, (now + h.retention, q.qnum))

    def _drop(self, qnum: int, index: _Index, mids: Iterable[int]) -> None:
        """Delete the history of ``mids`` of queue ``qnum``: their own records, and their ids from the records
        they share with others (rewritten, or deleted with the last of them)."""
        gone: set[int] = set()
        seqs: dict[int, None] = {}  # in order, each once
        for mid in mids:
            own = index.ids.pop(mid, None)
            if own is not None:
                gone.add(mid)
                seqs.update(dict.fromkeys(own))
        if not gone:
            return
        deletes: list[bytes] = []
        for seq in sorted(seqs):
            key = _RECORD_KEY.pack(qnum, seq)
            shared = index.shared.get(seq)
            if shared is None:
                deletes.append(key)
                continue
            head, members = shared
            rest = tuple(mid for mid in members if mid not in gone)
            if rest:
                index.shared[seq] = (head, rest)
                self._writes.put(self._events_db, key, _record_value(head, rest))
            else:
                del index.shared[seq]
                deletes.append(key)
        self._writes.delete_many(self._events_db, deletes)

    def _record_published(
        self, q: QueueState, first: int, op: Publish, indexes: Sequence[int], values: list[bytes] | None = None
    ) -> None:
        """The published events of the messages ``first``, ``first + 1``... made of ``op``'s payloads at
        ``indexes`` (the headers are kept, the payload only when the queue keeps payloads)."""
        h = q.options.history
        assert h is not None
        if op.headers is None and not h.payloads:
            self._record_alike(q, EventKind.PUBLISHED, range(first, first + len(indexes)), 0, op.owner, {"by": op.by})
            return
        events: list[tuple[int, int, int, _Detail]] = []
        for k, i in enumerate(indexes):
            detail: dict[str, Any] = {"by": op.by}
            if op.headers is not None and op.headers[i]:
                detail["headers"] = op.headers[i]
            if h.payloads:
                detail["payload"] = op.payloads[i]
            events.append((first + k, 0, op.owner, detail))
        self._record_many(q, EventKind.PUBLISHED, events)

    def _record_moved(
        self,
        q: QueueState,
        mid: int,
        to: QueueState | None,
        kind: EventKind,
        value: bytes | memoryview | None,
        **detail: Any,
    ) -> None:
        """``mid`` of ``q`` (stored as ``value``) was moved, dead-lettered or redriven, to ``to`` as its newest
        message: recorded in both queues that keep history."""
        if to is None or value is None:
            return  # nothing was moved (the message was missing)
        new_id = to.next_id - 1
        self._record(q, mid, kind, to=to.name, id=new_id, **detail)
        h = to.options.history
        if h is not None:
            _, payload, headers = decode_message(value)
            arrived: dict[str, Any] = {"from": q.name, "from_id": mid, **detail}
            if headers:
                arrived["headers"] = headers
            if h.payloads:
                arrived["payload"] = bytes(payload)
            self._record(to, new_id, EventKind.PUBLISHED, **arrived)

    # The primitives every move goes through, extended to record it.
    def _dead_letter(
        self,
        q: QueueState,
        mid: int,
        qnum: int,
        reason: DeadLetterReason,
        prio: int,
        value: bytes | memoryview | None = None,
    ) -> None:
        if q.options.history is None and not self._has_history(q.dead_letter):
            super()._dead_letter(q, mid, qnum, reason, prio, value)
            return
        if value is None:
            value = self._read_txn().get(pack_key(qnum, mid))
        super()._dead_letter(q, mid, qnum, reason, prio, value)
        dlq = self._queues.get(q.dead_letter)
        self._record_moved(q, mid, dlq, EventKind.DEAD_LETTERED, value, reason=reason.value)

    def _expire_message(self, q: QueueState, mid: int, qnum: int, prio: int, value: bytes | memoryview) -> None:
        if q.options.expired == "drop":
            self._record(q, mid, EventKind.EXPIRED)
        super()._expire_message(q, mid, qnum, prio, value)

    def _has_history(self, name: str) -> bool:
        q = self._queues.get(name)
        return q is not None and q.options.history is not None

    def _record_purge(self, q: QueueState, keep: dict[int, set[int]]) -> None:
        """The purged events of every message of ``q`` a purge keeping ``keep`` (qnum -> ids) removes."""
        if q.options.history is None:
            return
        purged: list[int] = []
        txn = self._read_txn()
        for qnum in q.storage():
            kept = keep.get(qnum, set())
            cur = txn.cursor()
            if not cur.set_range(QNUM.pack(qnum)):
                continue
            for key in cur.iternext(values=False):
                kq, mid = unpack_key(key)
                if kq != qnum:
                    break
                if mid not in kept:
                    purged.append(mid)
        purged.extend(range(q.visible_hi, q.next_id))  # published by this batch: not readable yet
        self._record_alike(q, EventKind.PURGED, purged)

    def _forget_history(self, q: QueueState) -> None:
        """Delete everything recorded of ``q`` (its history was turned off, or the queue deleted)."""
        if self._histories.pop(q.qnum, None) is not None:
            self._writes.prefix_delete(self._events_db, QNUM.pack(q.qnum))

    # ----------------------------------------------------------------------------------------------- retention
    def _prune_history(self, wall: float) -> None:
        """Delete the history of messages that ended longer than their queue's retention ago."""
        timers = self._history_timers
        while timers and timers[0][0] <= wall:
            _, qnum = heapq.heappop(timers)
            q = self._by_qnum.get(qnum)
            index = self._histories.get(qnum)
            if q is None or index is None or q.options.history is None:
                continue
            horizon = wall - q.options.history.retention
            ended: list[int] = []
            while index.ended and index.ended[0][0] <= horizon:
                ended.extend(index.ended.popleft()[1])
            self._drop(qnum, index, ended)
            if index.ended:
                heapq.heappush(timers, (index.ended[0][0] + q.options.history.retention, qnum))

    def _load_history(self, txn: lmdb.Transaction) -> None:
        """Rebuild the indexes from the events database (on open, and after a failed commit)."""
        self._histories.clear()
        self._history_timers.clear()
        stored = int(txn.get(HISTORY_SEQ, b"0", db=self._meta_db))
        self._history_seq = max(self._history_seq, stored)
        index: _Index | None = None
        last_qnum = -1
        for key, value in txn.cursor(db=self._events_db):
            qnum, seq = _RECORD_KEY.unpack(key)
            self._history_seq = max(self._history_seq, seq)  # a sequence is never given twice
            if qnum != last_qnum:
                index, last_qnum = self._histories.setdefault(qnum, _Index()), qnum
            assert index is not None
            head, mids = _split_record(value)
            at, kind = msgpack.unpackb(head, raw=False)[:2]
            if kind == EventKind.PUBLISHED.value:
                index.ids.update([(mid, [seq]) for mid in mids])
            else:
                for mid in mids:
                    own = index.ids.get(mid)
                    if own is not None:
                        own.append(seq)
            if len(mids) > 1:
                index.shared[seq] = (bytes(head), mids)
            if kind in _TERMINAL:
                index.ended.append((at, mids))
        for qnum, index in self._histories.items():
            q = self._by_qnum.get(qnum)
            # Records are in sequence order; the clock may have stepped back between two of them.
            index.ended = deque(sorted(index.ended, key=lambda item: item[0]))
            if q is not None and q.options.history is not None and index.ended:
                heapq.heappush(self._history_timers, (index.ended[0][0] + q.options.history.retention, qnum))

    # ----------------------------------------------------------------------------------------------- reading
    def _history_of(self, op: History) -> MessageHistory:
        q = self._queue(op.queue)
        found = self._read_history(q, op.id) if q.options.history is not None else None
        if found is None:
            raise StoreError(StoreCode.NOT_FOUND, f"no history of message {op.id} of queue {op.queue!r}")
        return found

    def _history_list(self, op: HistoryList) -> list[MessageHistory]:
        q = self._queue(op.queue)
        index = self._histories.get(q.qnum)
        if q.options.history is None or index is None:
            return []
        out: list[MessageHistory] = []
        for scanned, mid in enumerate(reversed(index.ids)):
            if len(out) >= op.max or scanned >= LIST_SCAN:
                break
            found = self._read_history(q, mid)
            if found is not None and matches(found, op):
                out.append(found)
        return out

    def _read_history(self, q: QueueState, mid: int) -> MessageHistory | None:
        index = self._histories.get(q.qnum)
        seqs = index.ids.get(mid) if index is not None else None
        if not seqs:
            return None
        events: list[HistoryEvent] = []
        txn = self._read_txn()
        for seq in list(seqs):
            value = txn.get(_RECORD_KEY.pack(q.qnum, seq), db=self._events_db)
            if value is None:
                continue  # recorded by the batch in progress: a read sees what was committed before it
            at, kind, attempt, connection, detail = msgpack.unpackb(_split_record(value)[0], raw=False)
            events.append(HistoryEvent(at, _KINDS[kind], attempt, connection, detail or {}))
        if not events:
            return None
        first = events[0]
        headers = first.detail.pop("headers", None) if first.kind == EventKind.PUBLISHED else None
        payload = first.detail.pop("payload", None) if first.kind == EventKind.PUBLISHED else None
        return MessageHistory(q.name, mid, events, headers, payload)


def matches(found: MessageHistory, op: HistoryList) -> bool:
    """Whether ``found`` passes the filters of ``op`` (state, publish time range, header)."""
    if op.state is not None and found.state != op.state:
        return False
    if op.since is not None and found.published_at < op.since:
        return False
    if op.until is not None and found.published_at > op.until:
        return False
    if op.header is not None:
        name, value = op.header
        return (found.headers or {}).get(name) == value
    return True
