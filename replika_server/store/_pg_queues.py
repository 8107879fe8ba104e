"""Queue management and reading on PostgreSQL (declare, purge, delete, stats, peek, redrive) and the timer run
(:class:`~replika_server.store.base.Expire`), with the semantics of the LMDB engine's (:mod:`.lmdb_engine`)."""

from __future__ import annotations

from typing import Any

from replika_server.store._engine import DEAD_LETTER_HEADERS, DEAD_LETTER_PREFIX
from replika_server.store._pg_core import (
    DELAYED,
    LEASED,
    ROW_COLUMNS,
    MessageRow,
    PgQueue,
    encode_options,
    unpack_headers,
    wire_size,
)
from replika_server.store._pg_delivery import EXPIRE_BATCH, PgDelivering
from replika_server.store.base import (
    Declare,
    DeleteQueue,
    EventKind,
    Expire,
    Peek,
    Peeked,
    Purge,
    QueueStats,
    Redrive,
    Stats,
    is_valid_queue_name,
)

__all__ = ["NODE_TIMEOUT", "PgQueues"]

#: Seconds without a heartbeat after which the other nodes take a node for dead and end its leases at once.
NODE_TIMEOUT = 15.0
#: Ready messages a redrive reads per query.
_REDRIVE_CHUNK = 500

_EMPTY_COUNTERS = ("published", "delivered", "acked", "nacked", "expired", "dead_lettered", "dropped", "deduplicated")


class PgQueues(PgDelivering):
    """Declare, purge, delete, stats, peek, redrive and expire; see the module docstring."""

    _next_wall: float | None  # the engine's cached next timer (wall clock)

    # ----------------------------------------------------------------------------------------------- queues
    async def _declare(self, op: Declare) -> None:
        q = await self._find(op.queue, lock=True)
        if q is None:
            await self._get_or_create(op.queue, op.options)
            q = await self._find(op.queue, lock=True)
            assert q is not None
        old = q.options
        if old == op.options:
            return
        new = q.options = op.options
        await self._cur.execute("UPDATE replika_queues SET options = %s WHERE name = %s", (encode_options(new), q.name))
        if new.history is None and old.history is not None:
            await self._forget_history(q.name)
        if new.message_ttl != old.message_ttl:
            # Messages already there expire by the new TTL (or only by their own, without one).
            await self._cur.execute(
                "UPDATE replika_messages SET expires_at = CASE WHEN %s::float8 IS NULL THEN own_expiry "
                "ELSE least(own_expiry, published_at + %s::float8) END WHERE queue = %s",
                (new.message_ttl or None, new.message_ttl or None, q.name),
            )
            self._batch.timers.append(self._clock.time())

    async def _purge(self, op: Purge) -> int:
        q = await self._queue(op.queue)
        await self._cur.execute(
            "DELETE FROM replika_messages WHERE queue = %s AND state <> 1 RETURNING id, size", (q.name,)
        )
        gone = await self._cur.fetchall()
        q.changed(-len(gone), -sum(int(r[1]) for r in gone))
        if q.options.history is not None:
            await self._record_many(q, EventKind.PURGED, ((int(r[0]), 0, 0, None) for r in sorted(gone)))
        return len(gone)

    async def _delete_queue(self, op: DeleteQueue) -> None:
        q = await self._queue(op.queue)
        for table in ("replika_messages", "replika_dedup", "replika_bindings"):
            await self._cur.execute(f"DELETE FROM {table} WHERE queue = %s", (q.name,))
        await self._cur.execute("DELETE FROM replika_queues WHERE name = %s", (q.name,))
        await self._forget_history(q.name)
        self._batch.queues.pop(q.name, None)
        self._batch.deleted.add(q.name)

    # ----------------------------------------------------------------------------------------------- reading
    async def _stats(self, op: Stats) -> list[QueueStats]:
        if op.queue is not None:
            queues = [await self._queue(op.queue)]
        else:
            # Every queue's row in one statement, not a read per queue: the admin sampler asks for this each second.
            await self._cur.execute("SELECT name, options, count, bytes FROM replika_queues ORDER BY name")
            queues = [self._known(str(r[0]), r[1], r[2], r[3]) for r in await self._cur.fetchall()]
        names = [q.name for q in queues]
        # Leased and delayed messages are counted through their partial indexes, and ready ones are the rest of the
        # queue's count: a grouped count of every message was a scan of the whole backlog (34 ms at 200,000
        # messages, against 0.05) that every node's admin sampler ran once a second.
        await self._cur.execute(
            "SELECT queue, 1, count(*) FROM replika_messages WHERE state = 1 AND queue = ANY(%(q)b::text[]) GROUP BY 1 "
            "UNION ALL "
            "SELECT queue, 2, count(*) FROM replika_messages WHERE state = 2 AND queue = ANY(%(q)b::text[]) GROUP BY 1",
            {"q": names},
        )
        by_state: dict[tuple[str, int], int] = {(str(r[0]), int(r[1])): int(r[2]) for r in await self._cur.fetchall()}
        await self._cur.execute(
            "SELECT queue, pattern FROM replika_bindings WHERE queue = ANY(%b::text[]) ORDER BY 1, 2", (names,)
        )
        bindings: dict[str, list[str]] = {}
        for queue, pattern in await self._cur.fetchall():
            bindings.setdefault(queue, []).append(pattern)
        return [self._queue_stats(q, by_state, bindings.get(q.name, [])) for q in queues]

    def _queue_stats(self, q: PgQueue, by_state: dict[tuple[str, int], int], bindings: list[str]) -> QueueStats:
        max_length, max_bytes = q.limits(self._options.default_max_length, self._options.default_max_bytes)
        counters = dict.fromkeys(_EMPTY_COUNTERS, 0)
        kept = self._counters.get(q.name)
        if kept is not None:
            counters.update(kept.as_dict())
        for name, n in self._batch.counters.get(q.name, {}).items():
            counters[name] += n
        in_flight, delayed = by_state.get((q.name, LEASED), 0), by_state.get((q.name, DELAYED), 0)
        return QueueStats(
            name=q.name,
            ready=max(0, q.count - in_flight - delayed),  # never below zero: another node may commit between reads
            in_flight=in_flight,
            delayed=delayed,
            total=q.count,
            max_attempts=q.options.max_attempts,
            dead_letter=q.dead_letter,
            bytes=q.bytes,
            max_length=max_length,
            max_bytes=max_bytes,
            counters=counters,
            options=q.options,
            bindings=bindings,
        )

    async def _peek(self, op: Peek) -> list[Peeked]:
        q = await self._queue(op.queue)
        limit = q.options.max_attempts
        await self._cur.execute(
            f"SELECT {ROW_COLUMNS}, payload, headers FROM replika_messages WHERE queue = %s AND state = 0 "
            "AND id < %s AND (expires_at IS NULL OR expires_at > %s) AND (%s::int IS NULL OR attempts < %s::int) "
            "ORDER BY prio DESC, id LIMIT %s",
            (q.name, self._batch.visible(q.name), self._clock.time(), limit, limit, op.max),
        )
        out: list[Peeked] = []
        budget = op.max_bytes
        for r in await self._cur.fetchall():
            row = MessageRow(*r[:10])
            budget -= wire_size(row.size)
            if budget < 0 and out:
                break
            out.append((row.id, row.attempts, row.published_at, bytes(r[10]), unpack_headers(r[11])))
        return out

    async def _redrive(self, op: Redrive) -> int:
        q = await self._queue(op.queue)
        moved = 0
        now = self._clock.time()
        after = (10, 0)  # keyset position in delivery order: (priority, id) last read
        while moved < op.max:
            await self._cur.execute(
                f"SELECT {ROW_COLUMNS}, payload, headers FROM replika_messages WHERE queue = %s AND state = 0 "
                "AND id < %s AND (prio < %s OR (prio = %s AND id > %s)) ORDER BY prio DESC, id LIMIT %s FOR UPDATE",
                (q.name, self._batch.visible(q.name), after[0], after[0], after[1], _REDRIVE_CHUNK),
            )
            chunk = await self._cur.fetchall()
            if not chunk:
                break
            for r in chunk:
                row = MessageRow(*r[:10])
                after = (row.prio, row.id)
                if moved >= op.max:
                    break
                if self._expired(row, now):
                    await self._expire_message(q, row)
                    continue
                payload, headers = bytes(r[10]), unpack_headers(r[11])
                target = op.to or (headers or {}).get(DEAD_LETTER_HEADERS[0])
                if target is None or target == q.name or not is_valid_queue_name(target):
                    continue  # stays where it is
                await self._remove(q, [row.id])
                kept = {k: v for k, v in (headers or {}).items() if not k.startswith(DEAD_LETTER_PREFIX)}
                # A move, like dead-lettering: neither max_queues nor the target's limits may refuse it half-way.
                to = await self._get_or_create(target, limited=False)
                new_id = await self._append(to, row.prio, now, payload, kept or None)
                if q.options.history is not None or to.options.history is not None:
                    await self._record_moved(q, row.id, to, new_id, EventKind.REDRIVEN, payload, headers)
                moved += 1
        return moved

    # ----------------------------------------------------------------------------------------------- timers
    async def _expire(self, op: Expire) -> None:
        now = self._clock.time()
        await self._heartbeat(now)
        await self._expire_leases(now)
        await self._cur.execute(
            "WITH d AS (SELECT queue, id FROM replika_messages WHERE state = 2 AND due <= %s LIMIT %s "
            "FOR UPDATE SKIP LOCKED) UPDATE replika_messages m SET state = 0, due = 0 FROM d "
            "WHERE m.queue = d.queue AND m.id = d.id RETURNING m.queue",
            (now, EXPIRE_BATCH),
        )
        self._batch.readied.update(str(r[0]) for r in await self._cur.fetchall())
        await self._expire_ttls(now)
        await self._cur.execute(
            "DELETE FROM replika_dedup d USING replika_queues q WHERE d.queue = q.name "
            "AND d.seen_at + (q.options->>'dedup_window')::float8 <= %s",
            (now,),
        )
        await self._prune_history(now)
        await self._poll_idle()
        due = await self._next_due()
        # Work that is due already was left for the next run (a full EXPIRE_BATCH, rows another node holds):
        # moments later, not at once in a loop.
        self._next_wall = None if due is None else max(due, now + 0.05)

    async def _heartbeat(self, now: float) -> None:
        """Mark this node alive, and end the leases of nodes that have not been for :data:`NODE_TIMEOUT` s."""
        await self._cur.execute("UPDATE replika_nodes SET heartbeat = %s WHERE id = %s", (now, self._node))
        await self._cur.execute(
            "DELETE FROM replika_nodes WHERE heartbeat < %s AND id <> %s RETURNING id", (now - NODE_TIMEOUT, self._node)
        )
        dead = [int(r[0]) for r in await self._cur.fetchall()]
        if dead:
            await self._cur.execute(
                "UPDATE replika_messages SET deadline = %s WHERE state = 1 AND node = ANY(%b::bigint[]) "
                "AND deadline > %s",
                (now, dead, now),
            )

    async def _expire_ttls(self, now: float) -> None:
        await self._cur.execute(
            f"SELECT queue, {ROW_COLUMNS} FROM replika_messages WHERE expires_at <= %s AND state <> 1 "
            "ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, EXPIRE_BATCH),
        )
        for r in await self._cur.fetchall():
            q = await self._find(str(r[0]))
            if q is not None:
                await self._expire_message(q, MessageRow(*r[1:]))

    async def _poll_idle(self) -> None:
        """The fallback for a lost notification: queues this node found empty that have ready messages now."""
        if not self._idle:
            return
        await self._cur.execute(
            "SELECT q FROM unnest(%b::text[]) AS q WHERE EXISTS "
            "(SELECT 1 FROM replika_messages m WHERE m.queue = q AND m.state = 0)",
            (sorted(self._idle),),
        )
        self._batch.readied.update(str(r[0]) for r in await self._cur.fetchall())

    async def _next_due(self) -> float | None:
        """The earliest time (wall clock) at which a timer run has work, from the tables."""
        await self._cur.execute(
            "SELECT least("
            "(SELECT min(deadline) FROM replika_messages WHERE state = 1), "
            "(SELECT min(due) FROM replika_messages WHERE state = 2), "
            "(SELECT min(expires_at) FROM replika_messages WHERE expires_at IS NOT NULL AND state <> 1), "
            # Lower bounds for the two below (the earliest entry plus the shortest window or retention): exact
            # ones would join every row each run; an early run only finds nothing to do.
            "(SELECT min(seen_at) FROM replika_dedup) + (SELECT min((options->>'dedup_window')::float8) "
            "FROM replika_queues WHERE (options->>'dedup_window')::float8 > 0), "
            "(SELECT min(ended_at) FROM replika_history_msgs WHERE ended_at IS NOT NULL) + "
            "(SELECT min((options->'history'->>'retention')::float8) FROM replika_queues "
            "WHERE options->'history' <> 'null'::jsonb))"
        )
        row = await self._cur.fetchone()
        value: Any = row[0] if row else None
        return None if value is None else float(value)
