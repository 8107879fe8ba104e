"""Message history in the LMDB engine: each message's lifecycle events, recorded in the commit that makes them.

Only queues declared with ``history`` record anything. An event is a key of the ``history`` database,
``queue qnum (u32) + message id (u64) + event sequence (u64)``, whose value is msgpack ``[at, kind, attempt,
connection, detail or nil]``; the sequence is store-wide and persisted in ``meta`` so that a message's events
read back in the order they happened, across restarts too. The events go into the batch's write log like every
other write, so they are durable exactly when the change they describe is.

Retention: each queue keeps in memory the ids it has history of, in first-event order, and when each ended
message ended; :meth:`Historian._prune_history` (run by the Expire timer) deletes the history of messages that
ended more than ``retention`` seconds ago, and recording past ``max_messages`` deletes the oldest message's.
Both are rebuilt from the database on open. Only a published event starts a message's history: one already in
the queue when history was turned on, or whose history was pruned, records nothing more.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lmdb
import msgpack

from replika_server.store._engine import EngineCore, LmdbConfig
from replika_server.store._queue import QueueState
from replika_server.store._records import KEY, QNUM, decode_message, pack_key, unpack_key
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

__all__ = ["HISTORY_SEQ", "LIST_SCAN", "Historian", "matches"]

HISTORY_SEQ = b"history_seq"
_SEQ = struct.Struct(">Q")
_EVENT_KEY = struct.Struct(">IQQ")  # queue qnum, message id, event sequence
_KINDS = {kind.value: kind for kind in EventKind}
#: Most messages one HistoryList reads before it answers with what it found (a filter that matches little must
#: not read the whole history in one batch).
LIST_SCAN = 10_000


class _Index:
    """What one queue has history of: ids in first-event order, and (ended unix s, id) in the order they ended."""

    __slots__ = ("ended", "ids")

    def __init__(self) -> None:
        self.ids: OrderedDict[int, None] = OrderedDict()
        self.ended: deque[tuple[float, int]] = deque()


class Historian(EngineCore):
    """Recording, pruning and reading message history; see the module docstring."""

    def __init__(self, config: LmdbConfig) -> None:
        super().__init__(config)
        self._history_db = self._env.open_db(b"history")
        self._history_seq = 0
        self._histories: dict[int, _Index] = {}  # queue qnum -> its index
        self._history_timers: list[tuple[float, int]] = []  # (unix s, queue qnum): history to prune then

    # ----------------------------------------------------------------------------------------------- recording
    def _record(
        self, q: QueueState, mid: int, kind: EventKind, attempt: int = 0, connection: int = 0, **detail: Any
    ) -> None:
        """Log event ``kind`` of message ``mid`` of ``q`` in this batch, if ``q`` keeps history."""
        h = q.options.history
        if h is None:
            return
        index = self._histories.get(q.qnum)
        if index is None:
            index = self._histories[q.qnum] = _Index()
        if kind is not EventKind.PUBLISHED and mid not in index.ids:
            return  # a life is recorded from its publish: none before history was on, none after it was pruned
        now = self._clock.time()
        self._history_seq += 1
        value = msgpack.packb([now, kind.value, attempt, connection, detail or None], use_bin_type=True)
        self._writes.put(self._history_db, pack_key(q.qnum, mid) + _SEQ.pack(self._history_seq), value)
        self._writes.meta[HISTORY_SEQ] = str(self._history_seq).encode()
        if mid not in index.ids:
            index.ids[mid] = None
            while len(index.ids) > h.max_messages:
                oldest, _ = index.ids.popitem(last=False)
                self._writes.prefix_delete(self._history_db, pack_key(q.qnum, oldest))
        if kind in TERMINAL:
            index.ended.append((now, mid))
            heapq.heappush(self._history_timers, (now + h.retention, q.qnum))

    def _record_many(
        self, q: QueueState, kind: EventKind, events: Iterable[tuple[int, int, int, dict[str, Any] | None]]
    ) -> None:
        """:meth:`_record` for many events of one kind, (id, attempt, connection, detail) each: the hot paths
        (publish, fetch), with the per-event work cut to a key and an index insert."""
        index = self._index(q)
        if index is None:
            return
        now = self._clock.time()
        name, qnum, seq, ids = kind.value, q.qnum, self._history_seq, index.ids
        published = kind is EventKind.PUBLISHED
        key, packb = _EVENT_KEY.pack, msgpack.packb
        items: list[tuple[bytes | memoryview, bytes]] = []
        mids: list[int] = []
        # The events of one call are mostly alike (one connection, one attempt, one detail or none), so each
        # value is packed once: packing was a third of the cost of recording. A hit needs the very detail
        # object the value was packed from, which the cache holds, so a new dict at a reused id() cannot match.
        packed: dict[tuple[int, int], tuple[dict[str, Any] | None, bytes]] = {}
        for mid, attempt, connection, detail in events:
            if not published and mid not in ids:
                continue  # as in _record: recorded from its publish only
            seq += 1
            hit = packed.get((attempt, connection))
            if hit is None or hit[0] is not detail:
                value = packb([now, name, attempt, connection, detail], use_bin_type=True)
                hit = packed[attempt, connection] = (detail, value)
            items.append((key(qnum, mid, seq), hit[1]))
            mids.append(mid)
        self._log(q, index, kind, now, items, mids)

    def _record_alike(
        self,
        q: QueueState,
        kind: EventKind,
        mids: Iterable[int],
        attempt: int = 0,
        connection: int = 0,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """:meth:`_record_many` for events that differ only by message (a publish's, an ack's): one value, and
        the keys made in a comprehension."""
        index = self._index(q)
        if index is None:
            return
        ids = index.ids
        mids = list(mids) if kind is EventKind.PUBLISHED else [mid for mid in mids if mid in ids]
        now, qnum, seq, key = self._clock.time(), q.qnum, self._history_seq, _EVENT_KEY.pack
        value = msgpack.packb([now, kind.value, attempt, connection, detail], use_bin_type=True)
        items: list[tuple[bytes | memoryview, bytes]] = [
            (key(qnum, mid, seq + k), value) for k, mid in enumerate(mids, 1)
        ]
        self._log(q, index, kind, now, items, mids)

    def _index(self, q: QueueState) -> _Index | None:
        """What ``q`` has history of; None when it keeps none."""
        if q.options.history is None:
            return None
        index = self._histories.get(q.qnum)
        if index is None:
            index = self._histories[q.qnum] = _Index()
        return index

    def _log(
        self,
        q: QueueState,
        index: _Index,
        kind: EventKind,
        now: float,
        items: list[tuple[bytes | memoryview, bytes]],
        mids: list[int],
    ) -> None:
        """Write ``items``, the events ``kind`` of ``mids`` (in sequence order from the next one), and keep
        ``q``'s index and retention up to date."""
        if not items:
            return
        h = q.options.history
        assert h is not None
        ids = index.ids
        if kind is EventKind.PUBLISHED:
            ids.update(dict.fromkeys(mids))  # in C; a published id is new, and one already there keeps its place
        self._history_seq += len(items)
        self._writes.put_many(self._history_db, items)
        self._writes.meta[HISTORY_SEQ] = str(self._history_seq).encode()
        while len(ids) > h.max_messages:
            oldest, _ = ids.popitem(last=False)
            self._writes.prefix_delete(self._history_db, pack_key(q.qnum, oldest))
        if kind in TERMINAL:
            index.ended.extend(zip(itertools.repeat(now), mids))
            heapq.heappush(self._history_timers, (now + h.retention, q.qnum))

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
        events: list[tuple[int, int, int, dict[str, Any] | None]] = []
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
                    self._record(q, mid, EventKind.PURGED)
        for mid in range(q.visible_hi, q.next_id):  # published by this batch: not readable yet
            self._record(q, mid, EventKind.PURGED)

    def _forget_history(self, q: QueueState) -> None:
        """Delete everything recorded of ``q`` (its history was turned off, or the queue deleted)."""
        if self._histories.pop(q.qnum, None) is not None:
            self._writes.prefix_delete(self._history_db, QNUM.pack(q.qnum))

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
            while index.ended and index.ended[0][0] <= horizon:
                _, mid = index.ended.popleft()
                if mid in index.ids:
                    del index.ids[mid]
                    self._writes.prefix_delete(self._history_db, pack_key(qnum, mid))

    def _load_history(self, txn: lmdb.Transaction) -> None:
        """Rebuild the retention indexes from the history database (on open, and after a failed commit)."""
        self._histories.clear()
        self._history_timers.clear()
        stored = int(txn.get(HISTORY_SEQ, b"0", db=self._meta_db))
        self._history_seq = max(self._history_seq, stored)
        last: tuple[int, int] | None = None
        ended: dict[int, list[tuple[float, int]]] = {}
        terminal = {kind.value for kind in TERMINAL}
        for key, value in txn.cursor(db=self._history_db):
            qnum, mid = KEY.unpack(key[: KEY.size])
            if (qnum, mid) != last:
                last = (qnum, mid)
                self._histories.setdefault(qnum, _Index()).ids[mid] = None
            at, kind = msgpack.unpackb(value, raw=False)[:2]
            if kind in terminal:
                ended.setdefault(qnum, []).append((at, mid))
        for qnum, items in ended.items():
            q = self._by_qnum.get(qnum)
            items.sort()
            self._histories[qnum].ended.extend(items)
            if q is not None and q.options.history is not None and items:
                heapq.heappush(self._history_timers, (items[0][0] + q.options.history.retention, qnum))

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
        events = list(self._events(q.qnum, mid))
        if not events:
            return None
        first = events[0]
        headers = first.detail.pop("headers", None) if first.kind == EventKind.PUBLISHED else None
        payload = first.detail.pop("payload", None) if first.kind == EventKind.PUBLISHED else None
        return MessageHistory(q.name, mid, events, headers, payload)

    def _events(self, qnum: int, mid: int) -> Iterator[HistoryEvent]:
        prefix = pack_key(qnum, mid)
        cur = self._read_txn().cursor(db=self._history_db)
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if key[: len(prefix)] != prefix:
                return
            at, kind, attempt, connection, detail = msgpack.unpackb(value, raw=False)
            yield HistoryEvent(at, _KINDS[kind], attempt, connection, detail or {})


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
