"""Storing messages on PostgreSQL: publish (priorities, delays, TTLs, dedup ids), topic fan-out and bindings, and
the room a full queue makes under its overflow policy. As on LMDB (:mod:`._publishing`), a publish is planned
before anything is written, so that a refusal changes nothing and a topic publish is all or nothing.

A publish takes its queue's row lock first (``SELECT ... FOR UPDATE``), held to the commit: publishes to one
queue from several nodes are then serialised, so ids are assigned and committed in order, a dedup id is looked up
only after any other node's publish of it committed, and a limit is checked against the count every node sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replika_server.store._pg_core import ROW_COLUMNS, MessageRow, PgQueue, pack_headers
from replika_server.store._pg_history import PgHistorian
from replika_server.store._publishing import MAX_BINDINGS
from replika_server.store._topics import Bindings
from replika_server.store.base import (
    DEFAULT_DEDUP_WINDOW,
    Bind,
    DeadLetterReason,
    EventKind,
    Publish,
    Published,
    PublishTopic,
    QueueOptions,
    StoreCode,
    StoreError,
    Unbind,
    overage,
    queue_full,
)

__all__ = ["PgPublishing"]

#: Ready messages read per query while a full queue looks for the oldest ones to give up.
_ROOM_CHUNK = 1000


@dataclass(slots=True)
class _Rows:
    """Messages to insert, column by column (the arrays of one INSERT ... SELECT unnest)."""

    now: float = 0.0
    prio: list[int] = field(default_factory=list)
    state: list[int] = field(default_factory=list)
    due: list[float] = field(default_factory=list)
    own: list[float | None] = field(default_factory=list)
    expires: list[float | None] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    payload: list[bytes] = field(default_factory=list)
    headers: list[bytes | None] = field(default_factory=list)
    timers: set[float] = field(default_factory=set)
    ready: bool = False

    def add(
        self, q: PgQueue, op: Publish, now: float, payloads: list[bytes], packed: list[bytes | None], sizes: list[int]
    ) -> None:
        """``payloads`` of ``op`` (published ``now``; ``packed`` headers and ``sizes`` of each)."""
        self.now = now
        k = len(sizes)
        due = now + op.delay if op.delay > 0 else 0.0
        own = now + op.ttl if op.ttl is not None else None
        expires = q.expiry(now, own)
        self.prio += [op.priority] * k
        self.state += [2 if due else 0] * k
        self.due += [due] * k
        self.own += [own] * k
        self.expires += [expires] * k
        self.size += sizes
        self.payload += payloads
        self.headers += packed
        if due:
            self.timers.add(due)
        else:
            self.ready = True
        if expires is not None:
            self.timers.add(expires)


@dataclass(slots=True)
class _Plan:
    """What a publish will store, worked out before anything changes."""

    now: float
    fresh: list[int]  # indices of the payloads to store (not repeats)
    packed: list[bytes | None]  # their packed headers
    sizes: list[int]  # their sizes (payload plus packed headers)
    ids: list[int] | None  # with dedup ids: one id per payload, repeats' filled in already
    twins: dict[int, int] = field(default_factory=dict)
    victims: list[MessageRow] = field(default_factory=list)


class PgPublishing(PgHistorian):
    """Publish, publish_topic, bind and unbind; see the module docstring."""

    async def _publish(self, op: Publish) -> Published:
        now = self._clock.time()
        q = await self._find(op.queue, lock=True)
        plan = await self._plan(op.queue, q, op, now)
        if q is None:
            q = await self._get_or_create(op.queue)
            q = await self._find(op.queue, lock=True)
            assert q is not None
        return await self._apply(q, op, plan)

    async def _publish_group(self, ops: list[Publish]) -> list[Published | StoreError]:
        """Consecutive publishes to one queue without dedup ids (what many producers send in one loop turn): one
        lock, one id range and one INSERT for all. When they do not all fit, each runs on its own, so that each
        gets its own answer, as if the group had never been formed."""
        name = ops[0].queue
        now = self._clock.time()
        packed: list[list[bytes | None]] = [
            [pack_headers(h) for h in op.headers] if op.headers else [None] * len(op.payloads) for op in ops
        ]
        sizes = [
            [len(p) + (len(h) if h else 0) for p, h in zip(op.payloads, hs, strict=True)]
            for op, hs in zip(ops, packed, strict=True)
        ]
        n, added = sum(len(s) for s in sizes), sum(sum(s) for s in sizes)
        q, first = await self._reserve(name, n)  # the lock, the row and the ids in one round trip
        try:
            if await self._room(name, q, n, added):
                raise StoreError(StoreCode.QUEUE_FULL, "room must be made")  # victims: one at a time, in order
            await self._check_room_in_store(added)
        except StoreError:
            if q is not None:  # give the ids back: the lock is still ours, nobody took any after them
                await self._cur.execute("UPDATE replika_queues SET next_id = %s WHERE name = %s", (first, name))
            return [await self._one_publish(op) for op in ops]
        if q is None:
            await self._get_or_create(name)
            q, first = await self._reserve(name, n)
            assert q is not None
        rows = _Rows()
        for op, hs, ss in zip(ops, packed, sizes, strict=True):
            rows.add(q, op, now, op.payloads, hs, ss)
        await self._insert_rows(q, first, rows)
        out: list[Published | StoreError] = []
        for op in ops:
            k = len(op.payloads)
            self._counter(q, "published", k)
            if q.options.history is not None:
                await self._record_published(q, first, op, range(k))
            out.append(Published(first, k))
            first += k
        return out

    async def _one_publish(self, op: Publish) -> Published | StoreError:
        try:
            return await self._publish(op)
        except StoreError as exc:
            return exc

    async def _insert_rows(self, q: PgQueue, first: int, rows: _Rows) -> None:
        """Store ``rows`` in ``q`` with consecutive ids from ``first``."""
        await self._cur.execute(
            "INSERT INTO replika_messages (queue, id, prio, state, due, published_at, own_expiry, expires_at, "
            "size, payload, headers) "
            "SELECT %s, %s + u.n - 1, u.prio, u.state, u.due, %s, u.own, u.expires, u.size, u.payload, u.headers "
            "FROM unnest(%b::smallint[], %b::smallint[], %b::float8[], %b::float8[], %b::float8[], %b::int[], "
            "%b::bytea[], %b::bytea[]) WITH ORDINALITY AS u(prio, state, due, own, expires, size, payload, headers, n)",
            (
                q.name,
                first,
                rows.now,
                rows.prio,
                rows.state,
                rows.due,
                rows.own,
                rows.expires,
                rows.size,
                rows.payload,
                rows.headers,
            ),
        )
        q.changed(len(rows.size), sum(rows.size))
        if rows.ready:
            self._batch.readied.add(q.name)
        self._batch.timers.extend(rows.timers)

    async def _plan(self, name: str, q: PgQueue | None, op: Publish, now: float) -> _Plan:
        """Resolve ``op``'s dedup ids, size what it will store and find room for it; raises if it cannot."""
        fresh: list[int] = []
        ids: list[int] | None = None
        twins: dict[int, int] = {}
        if op.dedup_ids is None:
            fresh = list(range(len(op.payloads)))
        else:
            ids = [0] * len(op.payloads)
            window = q.options.dedup_window if q is not None else DEFAULT_DEDUP_WINDOW
            seen = await self._dedup_hits(name, op.dedup_ids, now, window) if q is not None and window else {}
            first_seen: dict[str, int] = {}
            for i, dedup_id in enumerate(op.dedup_ids):
                if dedup_id is None or not window:
                    fresh.append(i)
                elif dedup_id in seen:
                    ids[i] = seen[dedup_id]
                elif dedup_id in first_seen:
                    twins[i] = first_seen[dedup_id]
                else:
                    first_seen[dedup_id] = i
                    fresh.append(i)
        headers = op.headers
        packed = [pack_headers(headers[i]) if headers else None for i in fresh]
        sizes = [len(op.payloads[i]) + (len(p) if p else 0) for i, p in zip(fresh, packed, strict=True)]
        victims = await self._room(name, q, len(fresh), sum(sizes)) if fresh else []
        return _Plan(now, fresh, packed, sizes, ids, twins, victims)

    async def _dedup_hits(self, queue: str, dedup_ids: list[str | None], now: float, window: float) -> dict[str, int]:
        wanted = sorted({d for d in dedup_ids if d is not None})
        if not wanted:
            return {}
        await self._cur.execute(
            "SELECT dedup_id, message_id FROM replika_dedup WHERE queue = %s AND dedup_id = ANY(%b::text[]) "
            "AND seen_at + %s > %s",
            (queue, wanted, window, now),
        )
        return {str(r[0]): int(r[1]) for r in await self._cur.fetchall()}

    async def _apply(self, q: PgQueue, op: Publish, plan: _Plan) -> Published:
        """Store what ``plan`` says in ``q``: (first_id, count), and the ids per payload with dedup ids."""
        await self._check_room_in_store(sum(plan.sizes))
        if plan.victims:
            await self._make_room(q, plan.victims)
        n = len(plan.fresh)
        first = await self._next_ids(q, n)
        if n:
            await self._insert(q, op, plan, first)
        ids = plan.ids
        if ids is None:
            return Published(first, n)
        assert op.dedup_ids is not None
        for k, i in enumerate(plan.fresh):
            ids[i] = first + k
        for i, j in plan.twins.items():
            ids[i] = ids[j]
        self._counter(q, "deduplicated", len(ids) - n)
        window = q.options.dedup_window
        remembered = [(op.dedup_ids[i], first + k) for k, i in enumerate(plan.fresh) if op.dedup_ids[i] is not None]
        if window and remembered:
            await self._cur.execute(
                "INSERT INTO replika_dedup (queue, dedup_id, seen_at, message_id) "
                "SELECT %s, u.d, %s, u.m FROM unnest(%b::text[], %b::bigint[]) AS u(d, m) "
                "ON CONFLICT (queue, dedup_id) DO UPDATE SET seen_at = EXCLUDED.seen_at, "
                "message_id = EXCLUDED.message_id",
                (q.name, plan.now, [d for d, _ in remembered], [m for _, m in remembered]),
            )
            self._batch.timers.append(plan.now + window)
        return Published(first, n, ids)

    async def _reserve(self, name: str, n: int) -> tuple[PgQueue | None, int]:
        """Lock queue ``name``, read it and reserve ``n`` consecutive ids: (the queue, the first id), or (None, 0)
        when it does not exist."""
        await self._cur.execute(
            "UPDATE replika_queues SET next_id = next_id + %s WHERE name = %s "
            "RETURNING next_id - %s, options, count, bytes",
            (n, name, n),
        )
        row = await self._cur.fetchone()
        if row is None:
            return None, 0
        first = int(row[0])
        self._batch.fresh.setdefault(name, first)
        return self._known(name, row[1], row[2], row[3]), first

    async def _next_ids(self, q: PgQueue, n: int) -> int:
        """Reserve ``n`` consecutive ids of ``q``; the first."""
        await self._cur.execute(
            "UPDATE replika_queues SET next_id = next_id + %s WHERE name = %s RETURNING next_id - %s",
            (n, q.name, n),
        )
        row = await self._cur.fetchone()
        assert row is not None
        first = int(row[0])
        self._batch.fresh.setdefault(q.name, first)
        return first

    async def _insert(self, q: PgQueue, op: Publish, plan: _Plan, first: int) -> None:
        rows = _Rows()
        rows.add(q, op, plan.now, [op.payloads[i] for i in plan.fresh], plan.packed, plan.sizes)
        await self._insert_rows(q, first, rows)
        self._counter(q, "published", len(plan.fresh))
        if q.options.history is not None:
            await self._record_published(q, first, op, plan.fresh)

    # ----------------------------------------------------------------------------------------------- room
    async def _room(self, name: str, q: PgQueue | None, n: int, added: int) -> list[MessageRow]:
        """What must leave queue ``name`` for ``n`` more messages of ``added`` bytes to fit its limits (see the
        LMDB engine's ``_room``); raises ``QUEUE_FULL`` when they cannot be made to fit."""
        options = self._options
        held = (q.count, q.bytes) if q is not None else (0, 0)
        limits = (q.options if q is not None else QueueOptions()).limits(
            options.default_max_length, options.default_max_bytes
        )
        over_count, over_bytes = overage(held, limits, (n, added))
        if over_count <= 0 and over_bytes <= 0:
            return []
        victims = None
        if q is not None and q.options.overflow != "reject":
            victims = await self._oldest_ready(q, over_count, over_bytes)
        if victims is not None:
            return victims
        why = "" if q is None or q.options.overflow == "reject" else " and its ready messages cannot make room"
        raise queue_full(name, held, limits, (n, added), why)

    async def _oldest_ready(self, q: PgQueue, over_count: int, over_bytes: int) -> list[MessageRow] | None:
        """The fewest ready messages of ``q``, lowest ids first, whose removal frees at least ``over_count``
        messages and ``over_bytes`` bytes; None if all of them are not enough."""
        victims: list[MessageRow] = []
        freed = size = 0
        after = 0
        while True:
            await self._cur.execute(
                f"SELECT {ROW_COLUMNS} FROM replika_messages WHERE queue = %s AND state = 0 AND id > %s "
                "AND id < %s ORDER BY id LIMIT %s FOR UPDATE",
                (q.name, after, self._batch.visible(q.name), _ROOM_CHUNK),
            )
            rows = [MessageRow(*r) for r in await self._cur.fetchall()]
            if not rows:
                return None
            for row in rows:
                victims.append(row)
                freed += 1
                size += row.size
                if freed >= over_count and size >= over_bytes:
                    return victims
            after = rows[-1].id

    async def _make_room(self, q: PgQueue, victims: list[MessageRow]) -> None:
        if q.options.overflow == "dead_letter":
            for row in victims:
                await self._dead_letter(q, row, DeadLetterReason.OVERFLOW)
            return
        for row in victims:
            await self._record(q, row.id, EventKind.DROPPED, reason="overflow")
        await self._remove(q, [row.id for row in victims])
        self._counter(q, "dropped", len(victims))

    # ----------------------------------------------------------------------------------------------- topics
    async def _publish_topic(self, op: PublishTopic) -> dict[str, list[int]]:
        await self._cur.execute("SELECT queue, pattern FROM replika_bindings")
        bindings = Bindings()
        for queue, pattern in await self._cur.fetchall():
            bindings.add(queue, pattern)
        names = bindings.match(op.topic)
        if not names:
            return {}
        if op.may_publish is not None:
            for name in names:
                if not op.may_publish(name):
                    raise StoreError(
                        StoreCode.FORBIDDEN, f"may not publish to queue {name!r}, which topic {op.topic!r} reaches"
                    )
        now = self._clock.time()
        sub = Publish("", op.payloads, op.headers, op.priority, op.delay, op.ttl, op.dedup_ids)
        plans: list[tuple[PgQueue, _Plan]] = []
        for name in names:  # sorted: nodes lock queue rows in one order, so they cannot deadlock on them
            q = await self._find(name, lock=True)
            if q is None:
                continue  # its queue was deleted by another node since the bindings were read
            plans.append((q, await self._plan(name, q, sub, now)))
        out: dict[str, list[int]] = {}
        await self._check_room_in_store(sum(sum(plan.sizes) for _, plan in plans))
        self._held = (self._held or 0) - sum(sum(plan.sizes) for _, plan in plans)  # counted again by each apply
        for q, plan in plans:
            result = await self._apply(q, sub, plan)
            out[q.name] = (
                result.ids if result.ids is not None else list(range(result.first_id, result.first_id + result.count))
            )
        return out

    async def _bind(self, op: Bind) -> None:
        q = await self._get_or_create(op.queue)
        await self._cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE pattern = %s) FROM replika_bindings WHERE queue = %s",
            (op.pattern, q.name),
        )
        row = await self._cur.fetchone()
        assert row is not None
        if row[1]:
            return
        if row[0] >= MAX_BINDINGS:
            raise StoreError(StoreCode.BAD_REQUEST, f"queue {q.name!r} has {MAX_BINDINGS} bindings, the most allowed")
        await self._cur.execute(
            "INSERT INTO replika_bindings (queue, pattern) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (q.name, op.pattern),
        )

    async def _unbind(self, op: Unbind) -> None:
        q = await self._queue(op.queue)
        await self._cur.execute("DELETE FROM replika_bindings WHERE queue = %s AND pattern = %s", (q.name, op.pattern))
