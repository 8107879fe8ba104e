"""Handing messages out and taking them back: fetch, the settle ops, ended leases, and the timer-driven work
(expired leases, delays that ran out, TTLs, dedup entries to forget)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from replika_server.store._engine import DELIVERY_OVERHEAD, state_value
from replika_server.store._history import Historian
from replika_server.store._queue import DELAYED, GRANTS_KEPT, LEASED, READY, Grant, QueueState, Tracked
from replika_server.store._records import (
    VALUE_HEAD_SIZE,
    decode_delivered,
    dedup_key,
    pack_key,
    published_at_of,
    unpack_head,
    unpack_key,
)
from replika_server.store.base import (
    VIEW_THRESHOLD,
    Ack,
    DeadLetterReason,
    Delivery,
    EventKind,
    Expire,
    Fetch,
    Nack,
    Reject,
    Release,
    Settle,
    Settled,
    StaleReason,
    Touch,
)

__all__ = ["DEDUP_PRUNE_SLACK", "SWEEP_BATCH", "Delivering"]

#: Expired messages one timer run removes from the fronts of one queue's lanes before it lets other work in; the
#: rest go on the next run, moments later.
SWEEP_BATCH = 10_000
#: Seconds added to a dedup entry's end before it is forgotten, so that one timer run forgets many at once.
DEDUP_PRUNE_SLACK = 1.0


class Delivering(Historian):
    """Fetch, ack, nack, reject, touch, release and expire; see the module docstring."""

    # ----------------------------------------------------------------------------------------------- fetch
    def _fetch(self, op: Fetch) -> list[Delivery]:
        q = self._get_or_create(op.queue)
        if q.count == len(q.tracked) and not q.n_ready:
            return []  # nothing ready: skip the read transaction entirely
        deadline = self._clock.monotonic() + op.lease
        if not q.options.message_ttl and q.lane0.peek_ready(q.tracked) is None and self._lane0_only(q):
            return self._fetch_fresh(q, op, deadline)
        return self._fetch_lanes(q, op, deadline)

    def _lane0_only(self, q: QueueState) -> bool:
        """Whether only lane 0 can have anything ready (true of every queue that never used priorities)."""
        if len(q.order) == 1:
            return True
        tracked = q.tracked
        return all(
            lane is q.lane0 or (lane.peek_ready(tracked) is None and not self._has_fresh(q, lane)) for lane in q.order
        )

    def _fetch_lanes(self, q: QueueState, op: Fetch, deadline: float) -> list[Delivery]:
        """The general path: highest lane first, lowest id first within it, records and never-delivered alike;
        expired messages and those at max_attempts are moved out on the way."""
        out: list[Delivery] = []
        limit = q.options.max_attempts
        now = self._clock.time()
        budget = op.max_bytes
        state_db = self._state_db
        writes = self._writes
        for lane in q.order:
            for mid, value, t in self._walk(q, lane):
                published_at, payload, headers = decode_delivered(value)
                if self._expired(q, t, published_at, now):
                    if t is None:
                        lane.cursor = mid + 1
                    self._expire_message(q, mid, lane.qnum if t is None else t.qnum, lane.prio, value)
                    continue
                if t is not None and limit is not None and t.attempts >= limit:
                    self._dead_letter(q, mid, t.qnum, DeadLetterReason.MAX_ATTEMPTS, t.prio, value)
                    continue
                budget -= len(value) + DELIVERY_OVERHEAD
                if budget < 0 and out:
                    break  # the reply must fit in one frame; the rest waits for the next fetch
                if t is None:
                    lane.cursor = mid + 1
                    t = Tracked(lane.qnum, mid, 1, 0, 0.0, LEASED, len(value) - VALUE_HEAD_SIZE, lane.prio)
                    q.track(mid, t)
                else:
                    t.attempts += 1
                self._token_seq += 1
                t.token = self._token_seq
                t.due = 0.0
                self._lease(q, t, deadline, op.owner)
                writes.put(state_db, pack_key(t.qnum, mid), state_value(t))
                out.append((mid, t.token, t.attempts, published_at, payload, headers))
                if len(out) >= op.max:
                    break
            if len(out) >= op.max or (budget < 0 and out):
                break
        if out:
            self._lease_group(deadline, q, (d[0] for d in out))
            q.counters.delivered += len(out)
            if q.options.history is not None:
                self._record_deliveries(q, out, op.owner)
        return out

    def _fetch_fresh(self, q: QueueState, op: Fetch, deadline: float) -> list[Delivery]:
        """The hot path of consuming a backlog: one lane, no TTL, and only never-delivered messages ready, so they
        are read in key order straight off an LMDB cursor, with :meth:`_lease` and :func:`decode_delivered` (for
        small messages without headers) inlined. The deliveries are recorded as one :class:`Grant`, not a state
        record each (see :mod:`._queue`)."""
        out: list[Delivery] = []
        lane = q.lane0
        cur = self._read_txn().cursor()
        if not cur.set_range(pack_key(q.qnum, lane.cursor)):
            return out
        qnum, hi, tracked, owner, limit = q.qnum, q.visible_hi, q.tracked, op.owner, op.max
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = set()
        budget = op.max_bytes
        base = self._token_seq + 1
        offset = first = 0  # token - id within this grant, and the grant's first id: set by its first message
        head = VALUE_HEAD_SIZE
        for key, value in cur:
            kq, mid = unpack_key(key)
            if kq != qnum or mid >= hi:
                break
            if mid in tracked:
                continue
            size = len(value)
            budget -= size + DELIVERY_OVERHEAD
            if budget < 0 and out:
                break  # the reply must fit in one frame; the rest waits for the next fetch
            if not first:  # ids start at 1
                offset, first = base - mid, mid
            token = offset + mid
            t = Tracked(qnum, mid, 1, token, 0.0, LEASED, size - head, 0, 0.0, False)
            t.deadline = deadline
            t.owner = owner
            tracked[mid] = t
            owned.add(t)
            published_at, hlen = unpack_head(value)
            if hlen or size - head >= VIEW_THRESHOLD:
                published_at, payload, headers = decode_delivered(value)
                out.append((mid, token, 1, published_at, payload, headers))
            else:
                # The read transaction does not use buffers: value is bytes, so is its slice.
                out.append((mid, token, 1, published_at, value[head:], None))
            if len(out) >= limit:
                break
        if out:
            q.n_leased += len(out)
            q.counters.delivered += len(out)
            last = out[-1][0]
            lane.cursor = last + 1
            self._token_seq = offset + last
            q.grants.append(Grant(first, last, base))
            self._touched[qnum] = q  # the grant is in the queue's meta record
            if len(q.grants) > GRANTS_KEPT:
                self._granted[qnum] = q
            self._lease_group(deadline, q, (d[0] for d in out))
            if q.options.history is not None:
                self._record_deliveries(q, out, owner)
        return out

    def _push_out_grants(self) -> None:
        """At the end of a batch: the messages of each grant beyond a queue's :data:`GRANTS_KEPT` that are still
        there and known by the grant alone (not :attr:`~Tracked.recorded`) get a state record, so that the meta
        record can forget the grant. A recorded message's record already holds its state: every change of what a
        record keeps writes it."""
        granted, self._granted = self._granted, {}
        for q in granted.values():
            if self._queues.get(q.name) is not q:
                continue  # deleted by this batch
            tracked, put, state_db = q.tracked, self._writes.put, self._state_db
            while len(q.grants) > GRANTS_KEPT:
                g = q.grants.pop(0)
                if g.last - g.first < len(tracked):
                    found = (tracked.get(mid) for mid in range(g.first, g.last + 1))
                else:
                    found = (t for mid, t in tracked.items() if g.first <= mid <= g.last)
                for t in found:
                    if t is not None and not t.recorded:
                        put(state_db, pack_key(t.qnum, t.mid), state_value(t))

    # ----------------------------------------------------------------------------------------------- settle
    def _ack(self, q: QueueState, leases: Iterable[Sequence[int]]) -> Settled:
        """The hot path of consuming: :meth:`_remove` inlined for a batch, one key per message for both DBs (the
        state database only for messages that have a record there: those of a grant mostly do not)."""
        failed: Settled = {}
        tracked = q.tracked
        owners = self._owners
        unleased = self._unleased
        keys: list[bytes] = []
        recorded: list[bytes] = []
        size = 0
        last_owner, owned = -1, None  # a batch's acks are mostly of one connection's deliveries
        for mid, token in leases:
            t = tracked.get(mid)
            if t is None or t.token != token or not token:  # 0: a settled (nacked) delivery
                failed[mid] = self._stale(t, token)
                continue
            del tracked[mid]
            size += t.size
            if t.status == LEASED:
                q.n_leased -= 1
                unleased.append(t)
                if t.owner != last_owner:
                    last_owner = t.owner
                    owned = owners.get(last_owner)
                if owned is not None:
                    owned.discard(t)
            elif t.status == READY:
                q.n_ready -= 1
            else:
                q.n_delayed -= 1
            key = pack_key(t.qnum, mid)
            keys.append(key)
            if t.recorded:
                recorded.append(key)
        if keys:
            self._writes.delete_many(self._msgs_db, keys)
            if recorded:
                self._writes.delete_many(self._state_db, recorded)
            self._writes.deletes += len(keys)
            q.count -= len(keys)
            q.counters.acked += len(keys)
            q.bytes -= size
            self._touched[q.qnum] = q
        return failed

    def _settle(self, op: Settle) -> Settled:
        q = self._queue(op.queue)
        if isinstance(op, Ack):
            if q.options.history is None:
                return self._ack(q, op.leases)
            acked = [tuple(lease) for lease in op.leases]
            refused = self._ack(q, acked)
            owner = op.owner
            self._record_alike(q, EventKind.ACKED, [mid for mid, _ in acked if mid not in refused], 0, owner)
            return refused
        failed: Settled = {}
        tracked = q.tracked
        now = self._clock.monotonic()
        for mid, token in op.leases:
            t = tracked.get(mid)
            if t is None or t.token != token or not token:  # 0: a settled (nacked) delivery
                failed[mid] = self._stale(t, token)
                continue
            if q.options.history is not None:
                self._record_settle(q, t, op)
            if isinstance(op, Nack):
                self._nack(q, t, op.delay, op.unseen)
            elif isinstance(op, Reject):
                self._dead_letter(q, mid, t.qnum, DeadLetterReason.REJECTED, t.prio)
            elif isinstance(op, Touch):
                self._unlease(t)
                if t.due:
                    # Its lease had ended into a retry delay: taken back, it must not wait that out again after a
                    # restart (which makes leased messages ready), so the record loses its due time too.
                    t.due = 0.0
                    self._writes.put(self._state_db, pack_key(t.qnum, mid), state_value(t))
                self._lease(q, t, now + op.lease, op.owner)
                self._lease_group(now + op.lease, q, (mid,))
        return failed

    def _record_deliveries(self, q: QueueState, out: list[Delivery], owner: int) -> None:
        if out and out[0][2] == out[-1][2] and len({d[2] for d in out}) == 1:  # one attempt, as a backlog's first
            self._record_alike(q, EventKind.DELIVERED, [d[0] for d in out], out[0][2], owner)
        else:
            self._record_many(q, EventKind.DELIVERED, ((d[0], d[2], owner, None) for d in out))

    def _record_settle(self, q: QueueState, t: Tracked, op: Settle) -> None:
        """The event of a nack or touch (a reject is recorded as the dead-lettering it causes)."""
        if isinstance(op, Nack):
            self._record(q, t.mid, EventKind.NACKED, t.attempts, op.owner, delay=op.delay, unseen=op.unseen)
        elif isinstance(op, Touch):
            self._record(q, t.mid, EventKind.TOUCHED, t.attempts, op.owner, lease=op.lease)

    def _stale(self, t: Tracked | None, token: int) -> StaleReason:
        """Why (id, ``token``) of a message whose record is ``t`` is not a current lease: off the hot path."""
        if not 0 < token <= self._token_seq:
            return StaleReason.UNKNOWN
        if t is None:
            return StaleReason.GONE
        if t.token > token:
            return StaleReason.REDELIVERED
        if t.token == 0 and t.attempts > 0:
            return StaleReason.SETTLED  # a nack zeroed it (tokens only grow, so this one was of an earlier delivery)
        return StaleReason.UNKNOWN

    def _nack(self, q: QueueState, t: Tracked, delay: float | None, unseen: bool = False) -> None:
        q.counters.nacked += 1
        if unseen:
            if t.attempts > 0:
                t.attempts -= 1  # persisted with the settled token
            if delay is None:
                delay = 0.0  # never processed: no reason to back off
        self._lease_ended(q, t, delay, settle=True)

    def _lease_ended(self, q: QueueState, t: Tracked, delay: float | None = None, settle: bool = False) -> None:
        """A lease ended without an ack (nack, expiry, closed connection). At max_attempts the message goes to the
        dead-letter queue; past its TTL it expires; else it is ready again after ``delay`` seconds (None: the
        queue's retry delay for its attempts). ``settle`` (a nack) also makes its token stale."""
        self._unlease(t)
        limit = q.options.max_attempts
        if limit is not None and t.attempts >= limit:
            self._dead_letter(q, t.mid, t.qnum, DeadLetterReason.MAX_ATTEMPTS, t.prio)
            return
        now = self._clock.time()
        published_at: float | None = None
        if t.expires or q.options.message_ttl:
            value = self._read_txn().get(pack_key(t.qnum, t.mid))
            if value is not None:
                published_at = published_at_of(value)
                if self._expired(q, t, published_at, now):
                    self._expire_message(q, t.mid, t.qnum, t.prio, value)
                    return
        if delay is None:
            delay = q.retry_delay(t.attempts)
        if settle:
            # Settled: this delivery's token may not ack, nack or touch any more, even after a restart.
            t.token = 0
        if delay > 0:
            t.due = now + delay
            q.set_status(t, DELAYED)
            heapq.heappush(self._delay_heap, (t.due, t.qnum, t.mid))
            self._writes.put(self._state_db, pack_key(t.qnum, t.mid), state_value(t))
        else:
            t.due = 0.0
            q.make_ready(t.mid, t)
            self._readied.add(q.name)
            if settle:
                self._writes.put(self._state_db, pack_key(t.qnum, t.mid), state_value(t))
        if published_at is not None:
            self._watch(q, t, published_at)

    def _current(self, t: Tracked) -> QueueState | None:
        """The queue of ``t`` if ``t`` is still the live record of its message (not settled, queue not gone)."""
        q = self._by_qnum.get(t.qnum)
        return q if q is not None and q.tracked.get(t.mid) is t else None

    def _release(self, op: Release) -> None:
        for t in self._owners.pop(op.owner, ()):
            q = self._current(t)
            if q is not None and t.status == LEASED and t.owner == op.owner:
                q.counters.expired += 1
                self._record(q, t.mid, EventKind.LEASE_EXPIRED, t.attempts, t.owner, closed=True)
                self._lease_ended(q, t)

    # ----------------------------------------------------------------------------------------------- timers
    def _expire(self, op: Expire) -> None:
        now = self._clock.monotonic()
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            deadline, _, qnum, mids = heapq.heappop(heap)
            q = self._by_qnum.get(qnum)
            if q is None:
                continue  # the queue is gone
            tracked = q.tracked
            for mid in mids:
                t = tracked.get(mid)
                if t is None or t.status != LEASED or t.deadline != deadline:
                    continue  # settled, touched or re-leased since
                q.counters.expired += 1
                self._record(q, mid, EventKind.LEASE_EXPIRED, t.attempts, t.owner)
                self._lease_ended(q, t)
        wall = self._clock.time()
        delays = self._delay_heap
        while delays and delays[0][0] <= wall:
            due, qnum, mid = heapq.heappop(delays)
            dq = self._by_qnum.get(qnum)
            delayed = dq.tracked.get(mid) if dq is not None else None
            if dq is None or delayed is None or delayed.status != DELAYED or delayed.due != due:
                continue
            dq.make_ready(mid, delayed)
            self._readied.add(dq.name)
        self._expire_ttls(wall)
        self._run_sweeps(wall)
        self._run_prunes(wall)
        self._prune_history(wall)

    def _expire_ttls(self, wall: float) -> None:
        """Ready and delayed messages whose TTL ran out leave their queue."""
        heap = self._ttl_heap
        later: list[tuple[float, int, int]] = []
        txn = self._read_txn()
        while heap and heap[0][0] <= wall:
            entry = heapq.heappop(heap)
            _, qnum, mid = entry
            q = self._by_qnum.get(qnum)
            t = q.tracked.get(mid) if q is not None else None
            if q is None or t is None or t.qnum != qnum or t.status == LEASED:
                continue  # gone, or leased: checked when the lease ends
            if mid >= q.visible_hi:
                later.append(entry)  # published by this very batch: not readable before its commit
                continue
            value = txn.get(pack_key(qnum, mid))
            if value is not None and self._expired(q, t, published_at_of(value), wall):
                self._expire_message(q, mid, qnum, t.prio, value)
        for entry in later:
            heapq.heappush(heap, entry)

    def _run_sweeps(self, wall: float) -> None:
        sweeps = self._sweeps
        while sweeps and sweeps[0][0] <= wall:
            when, qnum = heapq.heappop(sweeps)
            q = self._by_qnum.get(qnum)
            if q is None or q.qnum != qnum or q.ttl_sweep != when:
                continue  # queue gone, or rescheduled since
            q.ttl_sweep = 0.0
            self._sweep(q, wall)

    def _sweep(self, q: QueueState, wall: float) -> None:
        """Remove the never-delivered messages past the queue's message_ttl from the fronts of its lanes (they are
        in publish order, so the first that has not expired ends a lane's sweep) and schedule the next sweep."""
        ttl = q.options.message_ttl
        if not ttl:
            return
        nxt: float | None = None
        budget = SWEEP_BATCH
        for lane in q.order:
            if not self._has_fresh(q, lane):
                continue
            for mid, value in self._fresh(q, lane):
                ends = published_at_of(value) + ttl
                if ends > wall:
                    nxt = ends if nxt is None else min(nxt, ends)
                    break
                if budget == 0:
                    nxt = wall
                    break
                budget -= 1
                lane.cursor = mid + 1
                self._expire_message(q, mid, lane.qnum, lane.prio, value)
        if nxt is None and q.count > len(q.tracked):
            nxt = wall + ttl  # never-delivered messages this batch cannot see yet: they expire by then
        if nxt is not None:
            self._schedule_sweep(q, nxt)

    def _run_prunes(self, wall: float) -> None:
        prunes = self._prunes
        while prunes and prunes[0][0] <= wall:
            _, qnum = heapq.heappop(prunes)
            q = self._by_qnum.get(qnum)
            if q is not None and q.qnum == qnum:
                self._prune(q, wall)

    def _prune(self, q: QueueState, wall: float) -> None:
        """Forget ``q``'s dedup ids older than its window, in LMDB too, and schedule the next prune."""
        window = q.options.dedup_window
        for dedup_id in q.dedup.prune(wall, window):
            self._writes.delete(self._dedup_db, dedup_key(q.qnum, dedup_id))
        oldest = q.dedup.oldest()
        if oldest is not None:
            heapq.heappush(self._prunes, (oldest + window + DEDUP_PRUNE_SLACK, q.qnum))
