"""Handing messages out and taking them back on PostgreSQL: fetch, the settle ops, released and expired leases,
and the timer-driven work. The semantics are the LMDB engine's (:mod:`._delivery`), checked by the same contract
suite; what differs is where the state is, and that several nodes share it.

A fetch claims with ``FOR UPDATE SKIP LOCKED`` in one statement, so two nodes fetching from one queue never block
each other nor get the same message. Any node may settle a lease another granted: the token decides. Any node's
timer ends leases whose deadline passed, whoever granted them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from replika_server.store._pg_core import (
    ROW_COLUMNS,
    MessageRow,
    PgQueue,
    unpack_headers,
    wire_size,
)
from replika_server.store._pg_publishing import PgPublishing
from replika_server.store.base import (
    Ack,
    DeadLetterReason,
    Delivery,
    EventKind,
    Fetch,
    Nack,
    Reject,
    Release,
    Settle,
    Settled,
    StaleReason,
    StoreError,
    Touch,
)

__all__ = ["EXPIRE_BATCH", "PgDelivering"]

#: Leases, delays or TTLs one timer run ends per kind; the rest on the next run, moments later.
EXPIRE_BATCH = 10_000

# Claim the first ready messages of a queue, in delivery order, skipping those another transaction holds.
_CLAIM = (
    "WITH c AS (SELECT id, token FROM replika_messages WHERE queue = %(q)s AND state = 0 AND id < %(hi)s "
    "ORDER BY prio DESC, id LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
    "UPDATE replika_messages m SET state = 1, attempts = m.attempts + 1, token = nextval('replika_tokens'), "
    "due = 0, deadline = %(deadline)s, node = %(node)s, owner = %(owner)s FROM c "
    "WHERE m.queue = %(q)s AND m.id = c.id "
    f"RETURNING {', '.join('m.' + c for c in ROW_COLUMNS.split(', '))}, m.payload, m.headers, c.token"
)

# The claim of several fetches of one queue at once: the first ranks go to the first fetch, and so on.
_CLAIM_MANY = (
    "WITH c AS (SELECT id, token, prio FROM replika_messages WHERE queue = %(q)s AND state = 0 AND id < %(hi)s "
    "ORDER BY prio DESC, id LIMIT %(n)s FOR UPDATE SKIP LOCKED), "
    "r AS (SELECT id, token, row_number() OVER (ORDER BY prio DESC, id) AS rank FROM c), "
    "a AS (SELECT r.id, r.token, r.rank, o.owner, o.deadline FROM r JOIN "
    "unnest(%(lo)b::int[], %(up)b::int[], %(owners)b::bigint[], %(deadlines)b::float8[]) AS o(lo, up, owner, deadline) "
    "ON r.rank BETWEEN o.lo AND o.up) "
    "UPDATE replika_messages m SET state = 1, attempts = m.attempts + 1, token = nextval('replika_tokens'), "
    "due = 0, deadline = a.deadline, node = %(node)s, owner = a.owner FROM a "
    "WHERE m.queue = %(q)s AND m.id = a.id "
    f"RETURNING {', '.join('m.' + c for c in ROW_COLUMNS.split(', '))}, m.payload, m.headers, a.token, a.rank"
)


class PgDelivering(PgPublishing):
    """Fetch, ack, nack, reject, touch and release; see the module docstring."""

    _idle: set[str]  # queues whose last fetch here found nothing: the fallback poll checks them

    # ----------------------------------------------------------------------------------------------- fetch
    async def _fetch(self, op: Fetch) -> list[Delivery]:
        q = await self._get_or_create(op.queue)
        now = self._clock.time()
        deadline = now + op.lease
        out: list[Delivery] = []
        budget = op.max_bytes
        limit = q.options.max_attempts
        while len(out) < op.max:
            want = op.max - len(out)
            params = {
                "q": q.name,
                "n": want,
                "hi": self._batch.visible(q.name),
                "deadline": deadline,
                "node": self._node,
                "owner": op.owner,
            }
            await self._cur.execute(_CLAIM, params)
            claimed = await self._cur.fetchall()
            if not claimed:
                break
            claimed.sort(key=lambda r: (-r[1], r[0]))
            back: list[tuple[int, int]] = []  # (id, token before the claim): over the reply's budget
            for r in claimed:
                row = MessageRow(*r[:10])
                row.attempts -= 1  # as it was before this claim
                if back:
                    back.append((row.id, r[12]))
                elif self._expired(row, now):
                    await self._expire_message(q, row)
                elif limit is not None and row.attempts >= limit:
                    await self._dead_letter(q, row, DeadLetterReason.MAX_ATTEMPTS)
                else:
                    budget -= wire_size(row.size)
                    if budget < 0 and out:
                        back.append((row.id, r[12]))  # the reply must fit in one frame: the next fetch's
                        continue
                    out.append((row.id, r[4], row.attempts + 1, row.published_at, r[10], unpack_headers(r[11])))
            if back:
                await self._unclaim(q, back)
                break
            if len(claimed) < want:
                break
        await self._delivered(q, op, out, deadline)
        return out

    async def _fetch_group(self, ops: list[Fetch]) -> list[list[Delivery] | StoreError]:
        """Consecutive fetches of one queue (many consumers' in one loop turn) claimed in one statement, each
        taking the next ``max`` messages in delivery order. If any claimed message must be moved out instead
        (expired, at max_attempts) or does not fit its reply, the claim is undone and each fetch runs on its own,
        so that the results are exactly those of running them one after the other."""
        try:
            q = await self._get_or_create(ops[0].queue)
        except StoreError as exc:
            return [exc] * len(ops)
        now = self._clock.time()
        lo, up, rank = [], [], 0
        for op in ops:
            lo.append(rank + 1)
            rank += op.max
            up.append(rank)
        params = {
            "q": q.name,
            "hi": self._batch.visible(q.name),
            "n": rank,
            "lo": lo,
            "up": up,
            "owners": [op.owner for op in ops],
            "deadlines": [now + op.lease for op in ops],
            "node": self._node,
        }
        await self._cur.execute(_CLAIM_MANY, params)
        claimed = sorted(await self._cur.fetchall(), key=lambda r: r[13])
        out: list[list[Delivery]] = [[] for _ in ops]
        budgets = [op.max_bytes for op in ops]
        limit = q.options.max_attempts
        k = 0
        for r in claimed:
            while r[13] > up[k]:
                k += 1
            row = MessageRow(*r[:10])
            budgets[k] -= wire_size(row.size)
            spoilt = self._expired(row, now) or (limit is not None and row.attempts - 1 >= limit)
            if spoilt or (budgets[k] < 0 and out[k]):
                await self._unclaim(q, [(int(c[0]), int(c[12])) for c in claimed])
                return [await self._one(op) for op in ops]
            out[k].append((row.id, r[4], row.attempts, row.published_at, r[10], unpack_headers(r[11])))
        for op, delivered in zip(ops, out, strict=True):
            await self._delivered(q, op, delivered, now + op.lease)
        return list(out)

    async def _one(self, op: Fetch) -> list[Delivery] | StoreError:
        try:
            return await self._fetch(op)
        except StoreError as exc:
            return exc

    async def _delivered(self, q: PgQueue, op: Fetch, out: list[Delivery], deadline: float) -> None:
        """Count, time and record what a fetch delivered."""
        if out:
            self._counter(q, "delivered", len(out))
            self._batch.timers.append(deadline)
            self._idle.discard(q.name)
            if q.options.history is not None:
                await self._record_many(q, EventKind.DELIVERED, ((d[0], d[2], op.owner, None) for d in out))
        else:
            self._idle.add(q.name)

    async def _unclaim(self, q: PgQueue, back: list[tuple[int, int]]) -> None:
        """Put claimed messages back as they were: ready, their attempts and token unchanged."""
        await self._cur.execute(
            "UPDATE replika_messages m SET state = 0, attempts = m.attempts - 1, token = u.token, deadline = 0, "
            "node = 0, owner = 0 FROM unnest(%b::bigint[], %b::bigint[]) AS u(id, token) "
            "WHERE m.queue = %s AND m.id = u.id",
            ([i for i, _ in back], [t for _, t in back], q.name),
        )

    # ----------------------------------------------------------------------------------------------- settle
    async def _settle(self, op: Settle) -> Settled:
        q = await self._queue(op.queue)
        leases = cast(list[tuple[int, int]], op.leases)  # made a list of pairs by the engine's execute
        if isinstance(op, Ack):
            [result] = await self._ack_group([op])
            if isinstance(result, StoreError):
                raise result
            return result
        rows = await self._rows(q, sorted({mid for mid, _ in leases}))
        failed: Settled = {}
        now = self._clock.time()
        done: set[int] = set()
        for mid, token in leases:
            if mid in done:  # settled earlier in this op: read what that left
                rows.pop(mid, None)
                rows.update(await self._rows(q, [mid]))
            row = rows.get(mid)
            if row is None or row.token != token or not token:
                failed[mid] = await self._stale(row, token)
                continue
            done.add(mid)
            if isinstance(op, Nack):
                await self._record(q, mid, EventKind.NACKED, row.attempts, op.owner, delay=op.delay, unseen=op.unseen)
                await self._nack(q, row, op.delay, op.unseen)
            elif isinstance(op, Reject):
                await self._dead_letter(q, row, DeadLetterReason.REJECTED)
            elif isinstance(op, Touch):
                await self._record(q, mid, EventKind.TOUCHED, row.attempts, op.owner, lease=op.lease)
                await self._cur.execute(
                    "UPDATE replika_messages SET state = 1, due = 0, deadline = %s, node = %s, owner = %s "
                    "WHERE queue = %s AND id = %s",
                    (now + op.lease, self._node, op.owner, q.name, mid),
                )
                self._batch.timers.append(now + op.lease)
        return failed

    async def _ack_group(self, ops: list[Ack]) -> list[Settled | StoreError]:
        """Consecutive acks of one queue (what many consumers send in one loop turn) in one statement; each op's
        refused leases are its own, judged in op order as if they ran one after the other."""
        try:
            q = await self._queue(ops[0].queue)
        except StoreError as exc:
            return [exc] * len(ops)
        per_op = [cast(list[tuple[int, int]], op.leases) for op in ops]  # lists of pairs: see execute
        leases = [lease for op_leases in per_op for lease in op_leases]
        await self._cur.execute(
            "DELETE FROM replika_messages m USING unnest(%b::bigint[], %b::bigint[]) AS u(id, token) "
            "WHERE m.queue = %s AND m.id = u.id AND m.token = u.token AND u.token <> 0 RETURNING m.id, m.token, m.size",
            ([mid for mid, _ in leases], [token for _, token in leases], q.name),
        )
        deleted = await self._cur.fetchall()
        acked = {int(r[0]): int(r[1]) for r in deleted}
        if deleted:
            q.changed(-len(deleted), -sum(int(r[2]) for r in deleted))
            self._counter(q, "acked", len(deleted))
        unclaimed = dict(acked)  # each deleted row answers for the first lease that names it
        out: list[Settled | StoreError] = []
        for op, op_leases in zip(ops, per_op, strict=True):
            refused: list[tuple[int, int, bool]] = []  # (id, token, whether its message was acked before it)
            mine: list[int] = []
            for mid, token in op_leases:
                if unclaimed.get(mid) == token:
                    del unclaimed[mid]
                    mine.append(mid)
                else:
                    refused.append((mid, token, mid in acked and mid not in unclaimed))
            out.append(await self._refusals(q, refused, acked))
            if mine and q.options.history is not None:
                await self._record_many(q, EventKind.ACKED, ((mid, 0, op.owner, None) for mid in mine))
        return out

    async def _refusals(self, q: PgQueue, refused: list[tuple[int, int, bool]], acked: dict[int, int]) -> Settled:
        failed: Settled = {}
        if not refused:
            return failed
        rows = await self._rows(q, sorted({mid for mid, _, _ in refused}), lock=False)
        for mid, token, after_ack in refused:
            row = rows.get(mid)
            if mid in acked and not after_ack:
                # Refused before this batch acked its message: judged by the row as it was then.
                row = MessageRow(mid, 0, 1, 1, acked[mid], 0.0, 0.0, None, None, 0)
            failed[mid] = await self._stale(row, token)
        return failed

    async def _stale(self, row: MessageRow | None, token: int) -> StaleReason:
        """Why (id, ``token``) of a message whose row is ``row`` is not a current lease: off the hot path."""
        issued = self._batch.issued
        if issued is None or token > issued:  # read once per batch (refusals come many at a time), or if passed
            await self._cur.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM replika_tokens")
            latest = await self._cur.fetchone()
            issued = self._batch.issued = int(latest[0]) if latest else 0
        if not 0 < token <= issued:
            return StaleReason.UNKNOWN
        if row is None:
            return StaleReason.GONE
        if row.token > token:
            return StaleReason.REDELIVERED
        if row.token == 0 and row.attempts > 0:
            return StaleReason.SETTLED
        return StaleReason.UNKNOWN

    async def _nack(self, q: PgQueue, row: MessageRow, delay: float | None, unseen: bool = False) -> None:
        self._counter(q, "nacked")
        if unseen:
            if row.attempts > 0:
                row.attempts -= 1
            if delay is None:
                delay = 0.0
        await self._lease_ended(q, row, delay, settle=True)

    # ----------------------------------------------------------------------------------------------- leases ending
    async def _end_leases(self, rows: Sequence[tuple[str, MessageRow, int]], *, closed: bool) -> None:
        """Leases (queue, row, holder connection) that ended at their deadline or with their connection."""
        by_queue: dict[str, list[tuple[MessageRow, int]]] = {}
        for name, row, owner in rows:
            by_queue.setdefault(name, []).append((row, owner))
        for name in sorted(by_queue):
            q = await self._find(name)
            if q is None:
                continue
            ended = by_queue[name]
            self._counter(q, "expired", len(ended))
            detail: dict[str, Any] = {"closed": True} if closed else {}
            plain: list[int] = []
            for row, owner in ended:
                await self._record(q, row.id, EventKind.LEASE_EXPIRED, row.attempts, owner, **detail)
                if self._needs_care(q, row):
                    await self._lease_ended(q, row)
                else:
                    plain.append(row.id)
            if plain:  # ready again at once, the common case: one statement for all
                await self._cur.execute(
                    "UPDATE replika_messages SET state = 0, due = 0, node = 0, owner = 0 "
                    "WHERE queue = %s AND id = ANY(%b::bigint[])",
                    (q.name, plain),
                )
                self._batch.readied.add(q.name)

    def _needs_care(self, q: PgQueue, row: MessageRow) -> bool:
        """Whether an ended lease needs more than being made ready (dead-lettering, expiry, a retry delay)."""
        limit = q.options.max_attempts
        return bool(
            (limit is not None and row.attempts >= limit) or row.expires_at is not None or q.options.retry_delay
        )

    async def _release(self, op: Release) -> None:
        await self._cur.execute(
            f"SELECT queue, {ROW_COLUMNS} FROM replika_messages WHERE node = %s AND owner = %s AND state = 1 "
            "ORDER BY queue, id FOR UPDATE",
            (self._node, op.owner),
        )
        rows = [(str(r[0]), MessageRow(*r[1:]), op.owner) for r in await self._cur.fetchall()]
        await self._end_leases(rows, closed=True)

    async def _expire_leases(self, now: float) -> None:
        await self._cur.execute(
            f"SELECT queue, {ROW_COLUMNS}, owner FROM replika_messages WHERE state = 1 AND deadline <= %s "
            "ORDER BY deadline LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, EXPIRE_BATCH),
        )
        rows = [(str(r[0]), MessageRow(*r[1:11]), int(r[11])) for r in await self._cur.fetchall()]
        await self._end_leases(rows, closed=False)
