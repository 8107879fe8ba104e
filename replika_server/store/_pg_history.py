"""Message history in the PostgreSQL engine: the same events as on LMDB (:mod:`._history`), as rows.

``replika_history_msgs`` has one row per message whose life is recorded (its published event starts it; an event
of a message without a row is not recorded, as on LMDB), with when it ended; ``replika_history`` one row per event,
ordered per message by a store-wide sequence. Events are written in the batch's transaction, so they are durable
exactly when the change they describe is, on every node alike.

Retention: the timer deletes the history of messages that ended more than the queue's ``retention`` ago. The
oldest messages past ``max_messages`` are deleted at the end of each batch that recorded a publish, for queues of
at most :data:`EXACT_MAX_MESSAGES` messages of history; above that, by the next timer run (within a second on a
serving broker), so that a busy queue does not count its whole history in every commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from replika_server.store._history import LIST_SCAN, matches
from replika_server.store._pg_core import PgCore, PgQueue
from replika_server.store.base import (
    TERMINAL,
    EventKind,
    History,
    HistoryEvent,
    HistoryList,
    MessageHistory,
    Publish,
    StoreCode,
    StoreError,
)

__all__ = ["EXACT_MAX_MESSAGES", "PgHistorian"]

EXACT_MAX_MESSAGES = 10_000
_KINDS = {kind.value: kind for kind in EventKind}
_TERMINAL = [kind.value for kind in TERMINAL]
#: Ids a HistoryList reads per query while it looks for matches.
_LIST_CHUNK = 500

#: An event to record: (message id, attempt, connection, detail or None).
Event = tuple[int, int, int, "dict[str, Any] | None"]


def _pack(detail: dict[str, Any] | None) -> bytes | None:
    return msgpack.packb(detail, use_bin_type=True) if detail else None


class PgHistorian(PgCore):
    """Recording, pruning and reading message history; see the module docstring."""

    async def _record(
        self, q: PgQueue, mid: int, kind: EventKind, attempt: int = 0, connection: int = 0, **detail: Any
    ) -> None:
        await self._record_many(q, kind, [(mid, attempt, connection, detail or None)])

    async def _record_many(self, q: PgQueue, kind: EventKind, events: Iterable[Event]) -> None:
        """Log event ``kind`` of each of ``events`` in this batch, if ``q`` keeps history."""
        if q.options.history is None:
            return
        items = list(events)
        if not items:
            return
        now = self._clock.time()
        ids = [e[0] for e in items]
        if kind is EventKind.PUBLISHED:
            await self._cur.execute(
                "INSERT INTO replika_history_msgs (queue, id, first_seq, published_at) "
                "SELECT %s, u.id, u.id, %s FROM unnest(%b::bigint[]) AS u(id) ON CONFLICT DO NOTHING",
                (q.name, now, ids),
            )
            self._batch.history_published.add(q.name)
        await self._cur.execute(
            "INSERT INTO replika_history (queue, id, seq, at, kind, attempt, connection, detail) "
            "SELECT %s, u.id, nextval('replika_history_seq'), %s, %s, u.attempt, u.conn, u.detail "
            "FROM unnest(%b::bigint[], %b::int[], %b::bigint[], %b::bytea[]) AS u(id, attempt, conn, detail) "
            "WHERE EXISTS (SELECT 1 FROM replika_history_msgs m WHERE m.queue = %s AND m.id = u.id)",
            (
                q.name,
                now,
                kind.value,
                ids,
                [e[1] for e in items],
                [e[2] for e in items],
                [_pack(e[3]) for e in items],
                q.name,
            ),
        )
        if kind in TERMINAL:
            await self._cur.execute(
                "UPDATE replika_history_msgs SET ended_at = %s WHERE queue = %s AND id = ANY(%b::bigint[])",
                (now, q.name, ids),
            )
            self._batch.timers.append(now + q.options.history.retention)

    async def _record_published(self, q: PgQueue, first: int, op: Publish, indexes: Iterable[int]) -> None:
        """The published events of messages ``first``, ``first + 1``... made of ``op``'s payloads at ``indexes``."""
        h = q.options.history
        if h is None:
            return
        events: list[Event] = []
        for k, i in enumerate(indexes):
            detail: dict[str, Any] = {"by": op.by}
            if op.headers is not None and op.headers[i]:
                detail["headers"] = op.headers[i]
            if h.payloads:
                detail["payload"] = op.payloads[i]
            events.append((first + k, 0, op.owner, detail))
        await self._record_many(q, EventKind.PUBLISHED, events)

    async def _record_moved(
        self,
        q: PgQueue,
        mid: int,
        to: PgQueue,
        new_id: int,
        kind: EventKind,
        payload: bytes,
        headers: dict[str, str] | None,
        reason: str | None = None,
    ) -> None:
        """``mid`` of ``q`` was dead-lettered or redriven to ``to`` as ``new_id``: recorded in both queues that
        keep history."""
        extra: dict[str, Any] = {} if reason is None else {"reason": reason}
        await self._record(q, mid, kind, 0, 0, to=to.name, id=new_id, **extra)
        h = to.options.history
        if h is not None:
            arrived: dict[str, Any] = {"from": q.name, "from_id": mid, **extra}
            if headers:
                arrived["headers"] = headers
            if h.payloads:
                arrived["payload"] = payload
            await self._record(to, new_id, EventKind.PUBLISHED, **arrived)

    async def _forget_history(self, name: str) -> None:
        """Delete everything recorded of queue ``name`` (its history turned off, or the queue deleted)."""
        await self._cur.execute("DELETE FROM replika_history WHERE queue = %s", (name,))
        await self._cur.execute("DELETE FROM replika_history_msgs WHERE queue = %s", (name,))

    # ----------------------------------------------------------------------------------------------- retention
    async def _trim_history(self, q: PgQueue, *, exact_only: bool) -> None:
        """Delete the history of ``q``'s oldest messages past its max_messages."""
        h = q.options.history
        if h is None or (exact_only and h.max_messages > EXACT_MAX_MESSAGES):
            return
        await self._cur.execute(
            "SELECT id FROM replika_history_msgs WHERE queue = %s ORDER BY id DESC OFFSET %s LIMIT 1",
            (q.name, h.max_messages),
        )
        row = await self._cur.fetchone()
        if row is not None:
            await self._delete_history(q.name, "id <= %s", int(row[0]))

    async def _delete_history(self, queue: str, where: str, value: float) -> None:
        await self._cur.execute(
            "WITH gone AS (DELETE FROM replika_history_msgs WHERE queue = %s AND " + where + " RETURNING id) "
            "DELETE FROM replika_history h USING gone WHERE h.queue = %s AND h.id = gone.id",
            (queue, value, queue),
        )

    async def _prune_history(self, wall: float) -> None:
        """Delete the history of messages that ended longer than their queue's retention ago, and trim every
        queue to its max_messages."""
        await self._cur.execute("SELECT name FROM replika_queues WHERE options->'history' <> 'null'::jsonb")
        for (name,) in await self._cur.fetchall():
            q = await self._find(name)
            if q is None or q.options.history is None:
                continue
            await self._delete_history(name, "ended_at <= %s", wall - q.options.history.retention)
            await self._trim_history(q, exact_only=False)

    # ----------------------------------------------------------------------------------------------- reading
    async def _history_of(self, op: History) -> MessageHistory:
        q = await self._queue(op.queue)
        found = (await self._read_histories(q, [op.id])) if q.options.history is not None else []
        if not found:
            raise StoreError(StoreCode.NOT_FOUND, f"no history of message {op.id} of queue {op.queue!r}")
        return found[0]

    async def _history_list(self, op: HistoryList) -> list[MessageHistory]:
        q = await self._queue(op.queue)
        if q.options.history is None:
            return []
        out: list[MessageHistory] = []
        below: int | None = None
        scanned = 0
        while len(out) < op.max and scanned < LIST_SCAN:
            await self._cur.execute(
                "SELECT id FROM replika_history_msgs WHERE queue = %s AND (%s::bigint IS NULL OR id < %s) "
                "ORDER BY id DESC LIMIT %s",
                (q.name, below, below, min(_LIST_CHUNK, LIST_SCAN - scanned)),
            )
            ids = [int(r[0]) for r in await self._cur.fetchall()]
            if not ids:
                break
            scanned += len(ids)
            below = ids[-1]
            for found in await self._read_histories(q, ids):
                if matches(found, op):
                    out.append(found)
                    if len(out) >= op.max:
                        break
        return out

    async def _read_histories(self, q: PgQueue, ids: list[int]) -> list[MessageHistory]:
        """The recorded lives of messages ``ids`` of ``q`` that have any, in the order of ``ids``."""
        await self._cur.execute(
            "SELECT id, at, kind, attempt, connection, detail FROM replika_history "
            "WHERE queue = %s AND id = ANY(%b::bigint[]) ORDER BY id, seq",
            (q.name, ids),
        )
        events: dict[int, list[HistoryEvent]] = {}
        for mid, at, kind, attempt, connection, detail in await self._cur.fetchall():
            unpacked = msgpack.unpackb(detail, raw=False) if detail else {}
            events.setdefault(int(mid), []).append(HistoryEvent(at, _KINDS[kind], attempt, connection, unpacked))
        out: list[MessageHistory] = []
        for mid in ids:
            found = events.get(mid)
            if not found:
                continue
            first = found[0]
            published = first.kind == EventKind.PUBLISHED
            headers = first.detail.pop("headers", None) if published else None
            payload = first.detail.pop("payload", None) if published else None
            out.append(MessageHistory(q.name, mid, found, headers, payload))
        return out
