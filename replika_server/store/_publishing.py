"""Storing messages: publish (with priorities, delays, TTLs and dedup ids), topic fan-out and bindings, and the
room a full queue makes under its overflow policy.

A publish is planned before anything changes (dedup ids resolved, sizes counted, room found), so that a refusal
changes nothing and a topic publish can check every target queue before it stores in any: all or nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from replika_server.store._delivery import DEDUP_PRUNE_SLACK
from replika_server.store._engine import Ready, state_value
from replika_server.store._history import Historian
from replika_server.store._queue import DELAYED, READY, Lane, QueueState, Tracked
from replika_server.store._records import (
    VALUE_HEAD_SIZE,
    dedup_key,
    encode_message,
    pack_dedup,
    pack_key,
)
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

__all__ = ["BINDING_PREFIX", "MAX_BINDINGS", "Publishing", "binding_key"]

BINDING_PREFIX = b"b:"
#: Bindings per queue. Every topic a publisher uses for the first time is matched against every pattern, and the
#: answer cached; this keeps that bounded while leaving room for any routing table a person writes.
MAX_BINDINGS = 1000


def binding_key(queue: str, pattern: str) -> bytes:
    """The meta key recording one binding (its value is unused): b"b:" queue NUL pattern."""
    return BINDING_PREFIX + queue.encode() + b"\0" + pattern.encode()


#: A ready message a full queue gives up for a publish: (id, stored value, record or None, its lane).
Victim = tuple[int, "bytes | memoryview", "Tracked | None", Lane]


@dataclass(slots=True)
class _Plan:
    """What a publish will store, worked out before anything changes."""

    now: float
    fresh: list[int]  # indices of the payloads to store (not repeats)
    values: list[bytes]  # their encoded values, in that order
    added: int  # their bytes, as max_bytes counts them
    ids: list[int] | None  # with dedup ids: one id per payload, repeats' filled in already
    twins: dict[int, int] = field(default_factory=dict)  # payload index -> earlier index with its dedup id
    victims: list[Victim] = field(default_factory=list)


class Publishing(Historian):
    """Publish, publish_topic, bind and unbind; see the module docstring."""

    def _publish(self, op: Publish) -> Published:
        if self._full:
            raise StoreError(StoreCode.STORE_FULL, "the store is full; consumers must drain it first")
        if op.priority or op.delay or op.ttl is not None or op.dedup_ids is not None:
            q = self._queues.get(op.queue)
            plan = self._plan(op.queue, q, op, self._clock.time())
            if q is None:
                q = self._get_or_create(op.queue)
            return self._apply(q, op, plan)
        # The hot path: plain messages into lane 0, written in one segment.
        payloads = op.payloads
        n = len(payloads)
        now = self._clock.time()
        headers = op.headers
        # Sized before anything changes: a batch that does not fit is refused whole, and creates no queue.
        if headers is None:
            values = None
            added = sum(map(len, payloads))
        else:
            values = [encode_message(now, payload, headers[i]) for i, payload in enumerate(payloads)]
            added = sum(map(len, values)) - n * VALUE_HEAD_SIZE
        q = self._queues.get(op.queue)
        victims = self._room(op.queue, q, n, added)
        if q is None:
            q = self._get_or_create(op.queue)
        elif victims:
            self._make_room(q, victims)
        first = q.next_id
        qnum = q.qnum
        if values is None:
            head = encode_message(now, b"", None)  # the same for the whole batch: one concat per message
            items = [(pack_key(qnum, mid), head + payload) for mid, payload in enumerate(payloads, first)]
        else:
            items = [(pack_key(qnum, mid), value) for mid, value in enumerate(values, first)]
        self._writes.put_many(self._msgs_db, items)
        q.next_id = first + n
        q.lane0.last = q.next_id
        q.counters.published += n
        q.count += n
        q.bytes += added
        self._touched[qnum] = q
        self._readied.add(q.name)
        if q.options.message_ttl:
            self._schedule_sweep(q, now + q.options.message_ttl)
        if q.options.history is not None:
            self._record_published(q, first, op, range(n))
        return Published(first, n)

    def _plan(self, name: str, q: QueueState | None, op: Publish, now: float) -> _Plan:
        """Resolve ``op``'s dedup ids, encode what it will store and find room for it; raises if it cannot."""
        fresh: list[int] = []
        ids: list[int] | None = None
        twins: dict[int, int] = {}
        if op.dedup_ids is None:
            fresh = list(range(len(op.payloads)))
        else:
            ids = [0] * len(op.payloads)
            window = q.options.dedup_window if q is not None else DEFAULT_DEDUP_WINDOW
            first_seen: dict[str, int] = {}
            for i, dedup_id in enumerate(op.dedup_ids):
                if dedup_id is None or not window:
                    fresh.append(i)
                    continue
                hit = q.dedup.get(dedup_id, now, window) if q is not None else None
                if hit is not None:
                    ids[i] = hit
                elif dedup_id in first_seen:
                    twins[i] = first_seen[dedup_id]  # repeated within this publish: the first one's id
                else:
                    first_seen[dedup_id] = i
                    fresh.append(i)
        headers = op.headers
        values = [encode_message(now, op.payloads[i], headers[i] if headers else None) for i in fresh]
        added = sum(map(len, values)) - len(values) * VALUE_HEAD_SIZE
        victims = self._room(name, q, len(values), added) if values else []
        return _Plan(now, fresh, values, added, ids, twins, victims)

    def _apply(self, q: QueueState, op: Publish, plan: _Plan) -> Published:
        """Store what ``plan`` says in ``q``: (first_id, count), and the ids per payload with dedup ids."""
        if plan.victims:
            self._make_room(q, plan.victims)
        n = len(plan.values)
        first = q.next_id
        if n:
            if op.delay > 0 or op.ttl is not None:
                self._store_tracked(q, op, plan, first)
            else:
                lane = self._lane(q, op.priority)
                self._writes.put_many(
                    self._msgs_db, [(pack_key(lane.qnum, mid), v) for mid, v in enumerate(plan.values, first)]
                )
                lane.last = first + n
                self._readied.add(q.name)
            q.next_id = first + n
            q.count += n
            q.bytes += plan.added
            q.counters.published += n
            self._touched[q.qnum] = q
            if q.options.message_ttl:
                self._schedule_sweep(q, plan.now + q.options.message_ttl)
            if q.options.history is not None:
                self._record_published(q, first, op, plan.fresh)
        ids = plan.ids
        if ids is None:
            return Published(first, n)
        assert op.dedup_ids is not None
        for k, i in enumerate(plan.fresh):
            ids[i] = first + k
        for i, j in plan.twins.items():
            ids[i] = ids[j]
        q.counters.deduplicated += len(ids) - n
        window = q.options.dedup_window
        if window:
            for k, i in enumerate(plan.fresh):
                dedup_id = op.dedup_ids[i]
                if dedup_id is not None:
                    if not q.dedup:
                        heapq.heappush(self._prunes, (plan.now + window + DEDUP_PRUNE_SLACK, q.qnum))
                    q.dedup.add(dedup_id, plan.now, first + k)
                    self._writes.put(self._dedup_db, dedup_key(q.qnum, dedup_id), pack_dedup(plan.now, first + k))
        return Published(first, n, ids)

    def _store_tracked(self, q: QueueState, op: Publish, plan: _Plan, first: int) -> None:
        """Messages with a delay or a TTL of their own: under the queue's side prefix, with a record each."""
        side = self._side(q)
        self._lane(q, op.priority)  # whose heap takes them once ready
        due = plan.now + op.delay if op.delay > 0 else 0.0
        expires = plan.now + op.ttl if op.ttl is not None else 0.0
        status = DELAYED if due else READY
        msgs: list[tuple[bytes, bytes]] = []
        states: list[tuple[bytes, bytes]] = []
        for mid, value in enumerate(plan.values, first):
            key = pack_key(side, mid)
            t = Tracked(side, mid, 0, 0, due, status, len(value) - VALUE_HEAD_SIZE, op.priority, expires)
            q.track(mid, t)
            msgs.append((key, value))
            states.append((key, state_value(t)))
            if due:
                heapq.heappush(self._delay_heap, (due, side, mid))
            self._watch(q, t, plan.now)
        self._writes.put_many(self._msgs_db, msgs)
        self._writes.put_many(self._state_db, states)
        if not due:
            self._readied.add(q.name)

    # ----------------------------------------------------------------------------------------------- room
    def _room(self, name: str, q: QueueState | None, n: int, added: int) -> list[Victim]:
        """What must leave queue ``name`` (``q``, or None when it does not exist yet) for ``n`` more messages of
        ``added`` bytes to fit its max_length and max_bytes: nothing when they fit; ready messages, oldest first,
        under overflow drop_oldest or dead_letter. Raises ``QUEUE_FULL`` when they cannot be made to fit."""
        config = self._config
        held = (q.count, q.bytes) if q is not None else (0, 0)
        limits = (q.options if q is not None else QueueOptions()).limits(
            config.default_max_length, config.default_max_bytes
        )
        over_count, over_bytes = overage(held, limits, (n, added))
        if over_count <= 0 and over_bytes <= 0:
            return []
        victims = None
        if q is not None and q.options.overflow != "reject":
            victims = self._oldest_ready(q, over_count, over_bytes)
        if victims is not None:
            return victims
        why = "" if q is None or q.options.overflow == "reject" else " and its ready messages cannot make room"
        raise queue_full(name, held, limits, (n, added), why)

    def _oldest_ready(self, q: QueueState, over_count: int, over_bytes: int) -> list[Victim] | None:
        """The fewest ready messages of ``q``, lowest ids first across its lanes, whose removal frees at least
        ``over_count`` messages and ``over_bytes`` bytes; None if all of them are not enough."""
        victims: list[Victim] = []
        freed = size = 0
        if freed >= over_count and size >= over_bytes:
            return victims
        for mid, value, t, lane in heapq.merge(*(_tagged(self._view(q, lane), lane) for lane in q.order), key=_id):
            victims.append((mid, value, t, lane))
            freed += 1
            size += t.size if t is not None else len(value) - VALUE_HEAD_SIZE
            if freed >= over_count and size >= over_bytes:
                return victims
        return None

    def _make_room(self, q: QueueState, victims: list[Victim]) -> None:
        dead = q.options.overflow == "dead_letter"
        for mid, value, t, lane in victims:
            if t is None:
                lane.cursor = max(lane.cursor, mid + 1)  # the victims of a lane are a prefix of its run
            qnum, prio = (lane.qnum, lane.prio) if t is None else (t.qnum, t.prio)
            if dead:
                self._dead_letter(q, mid, qnum, DeadLetterReason.OVERFLOW, prio, value)
            else:
                self._record(q, mid, EventKind.DROPPED, reason="overflow")
                self._remove(q, mid, qnum, len(value) - VALUE_HEAD_SIZE)
                q.counters.dropped += 1

    # ----------------------------------------------------------------------------------------------- topics
    def _publish_topic(self, op: PublishTopic) -> dict[str, list[int]]:
        names = self._bindings.match(op.topic)
        if not names:
            return {}
        if op.may_publish is not None:
            for name in names:
                if not op.may_publish(name):
                    raise StoreError(
                        StoreCode.FORBIDDEN, f"may not publish to queue {name!r}, which topic {op.topic!r} reaches"
                    )
        if self._full:
            raise StoreError(StoreCode.STORE_FULL, "the store is full; consumers must drain it first")
        now = self._clock.time()
        sub = Publish("", op.payloads, op.headers, op.priority, op.delay, op.ttl, op.dedup_ids)
        plans = [(self._queues[name], self._plan(name, self._queues[name], sub, now)) for name in names]
        out: dict[str, list[int]] = {}
        for q, plan in plans:
            result = self._apply(q, sub, plan)
            out[q.name] = (
                result.ids if result.ids is not None else list(range(result.first_id, result.first_id + result.count))
            )
        return out

    def _bind(self, op: Bind) -> None:
        q = self._get_or_create(op.queue)
        if op.pattern in q.bindings:
            return
        if len(q.bindings) >= MAX_BINDINGS:
            raise StoreError(StoreCode.BAD_REQUEST, f"queue {q.name!r} has {MAX_BINDINGS} bindings, the most allowed")
        q.bindings.add(op.pattern)
        self._bindings.add(q.name, op.pattern)
        self._writes.meta[binding_key(q.name, op.pattern)] = b""

    def _unbind(self, op: Unbind) -> None:
        q = self._queue(op.queue)
        if op.pattern in q.bindings:
            q.bindings.discard(op.pattern)
            self._bindings.remove(q.name, op.pattern)
            self._writes.meta[binding_key(q.name, op.pattern)] = None


def _tagged(items: Iterator[Ready], lane: Lane) -> Iterator[Victim]:
    for mid, value, t in items:
        yield mid, value, t, lane


def _id(item: Victim) -> int:
    return item[0]
