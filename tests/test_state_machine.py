"""Each engine's store against a small in-memory model of the delivery semantics (hypothesis state machine).

Every step runs one batch on the store and the same operation on the model, then compares what a client can see:
each fetch's deliveries (ids, payloads, attempts, in order), each settle's failed map, and after every step the
queue's counts, the ready messages in delivery order (peek) and the dead-letter queue's contents. The store runs on
a manual clock that moves only when a step says so, so leases, delays, retry backoff and TTLs run out exactly when
the model says, with no sleeping. Restarts close and reopen the store. The machine runs once per engine (the
``store_space`` fixture), each example on a fresh store.

The default run is short, for the suite; ``REPLIKA_SM_EXAMPLES=5000`` (and ``REPLIKA_SM_STEPS``) runs it long.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar, cast

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replika_server import store as stores
from replika_server.store import (
    Ack,
    Declare,
    Delivery,
    Expire,
    Fetch,
    Nack,
    Op,
    Operation,
    Peek,
    Publish,
    Published,
    Purge,
    QueueOptions,
    StaleReason,
    Stats,
    Store,
    StoreError,
    StoreOptions,
    Touch,
)
from replika_server.store.base import Expired
from tests.clock import ManualClock
from tests.engines import StoreSpace

Q = "q"
DLQ = "q.dlq"
EXAMPLES = int(os.environ.get("REPLIKA_SM_EXAMPLES", "60"))
STEPS = int(os.environ.get("REPLIKA_SM_STEPS", "50"))

T = TypeVar("T")
R = TypeVar("R")
R2 = TypeVar("R2")


@dataclass
class Msg:
    """The model of one message of queue q."""

    id: int
    payload: bytes
    prio: int
    published: float
    expires: float | None  # its own TTL's end
    status: str = "ready"  # ready | leased | delayed
    attempts: int = 0
    due: float = 0.0
    token: int = 0  # current lease token; 0: none, or settled by a nack
    deadline: float = 0.0


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self, space: StoreSpace) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.space = space
        self.url = space.new()
        self.loop = asyncio.new_event_loop()
        self.store = self.open()
        self.msgs: dict[int, Msg] = {}
        self.next_id = 1
        self.dlq: list[tuple[int, bytes, str]] = []  # (priority, payload, reason) of each dead letter
        self.held: list[tuple[int, int]] = []  # every (id, token) ever delivered, current or stale
        self.last_token = 0
        self.options = QueueOptions()
        self.acked = self.dropped = self.dead_lettered = 0  # the store's counters: since it was opened

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
            self.loop.close()
        finally:
            self.space.drop(self.url)

    def open(self) -> Store:
        return self.run(stores.open(self.url, StoreOptions(durable=False, clock=self.clock)))

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(aw, 30))

    def one(self, op: Operation[R]) -> R:
        [result] = self.run(self.store.execute([cast(Op, op)])).results
        assert not isinstance(result, StoreError), result
        return cast(R, result)

    def both(self, first: Operation[R], second: Operation[R2]) -> tuple[R, R2]:
        a, b = self.run(self.store.execute([cast(Op, first), cast(Op, second)])).results
        assert not isinstance(a, StoreError) and not isinstance(b, StoreError), (a, b)
        return cast(R, a), cast(R2, b)

    # ------------------------------------------------------------------------------------------- the model
    def now(self) -> float:
        return self.clock.time()

    def expiry(self, m: Msg) -> float | None:
        ends = [e for e in (m.expires,) if e is not None]
        if self.options.message_ttl:
            ends.append(m.published + self.options.message_ttl)
        return min(ends) if ends else None

    def expired(self, m: Msg) -> bool:
        ends = self.expiry(m)
        return ends is not None and ends <= self.now()

    def doomed(self, m: Msg) -> bool:
        limit = self.options.max_attempts
        return limit is not None and m.attempts >= limit

    def dead_letter(self, m: Msg, reason: str) -> None:
        del self.msgs[m.id]
        self.dlq.append((m.prio, m.payload, reason))
        self.dead_lettered += 1

    def expire(self, m: Msg) -> None:
        if self.options.expired == "drop":
            del self.msgs[m.id]
            self.dropped += 1
        else:
            self.dead_letter(m, "expired")

    def retry_delay(self, attempts: int) -> float:
        o = self.options
        if not o.retry_delay:
            return 0.0
        cap = o.retry_max_delay if o.retry_max_delay is not None else 30 * 86400.0
        return min(o.retry_delay * o.retry_backoff ** max(attempts - 1, 0), cap)

    def lease_ended(self, m: Msg, delay: float | None, settle: bool) -> None:
        if self.doomed(m):
            self.dead_letter(m, "max_attempts")
            return
        if self.expired(m):
            self.expire(m)
            return
        if delay is None:
            delay = self.retry_delay(m.attempts)
        if settle:
            m.token = 0
        if delay > 0:
            m.status, m.due = "delayed", self.now() + delay
        else:
            m.status, m.due = "ready", 0.0

    def ready_order(self) -> list[Msg]:
        return sorted((m for m in self.msgs.values() if m.status == "ready"), key=lambda m: (-m.prio, m.id))

    def timers(self) -> None:
        """What an Expire at the current time does."""
        for m in [m for m in self.msgs.values() if m.status == "leased" and m.deadline <= self.now()]:
            self.lease_ended(m, None, settle=False)
        for m in self.msgs.values():
            if m.status == "delayed" and m.due <= self.now():
                m.status, m.due = "ready", 0.0
        for m in [m for m in self.msgs.values() if m.status != "leased" and self.expired(m)]:
            self.expire(m)

    # ------------------------------------------------------------------------------------------- rules
    @initialize(
        max_attempts=st.sampled_from([None, 2, 3]),
        message_ttl=st.sampled_from([None, None, 40.0]),
        retry_delay=st.sampled_from([0.0, 0.0, 3.0]),
        expired=st.sampled_from(["dead_letter", "drop"]),
    )
    def declare(
        self, max_attempts: int | None, message_ttl: float | None, retry_delay: float, expired: Expired
    ) -> None:
        self.options = QueueOptions(
            max_attempts=max_attempts,
            message_ttl=message_ttl,
            retry_delay=retry_delay,
            retry_backoff=2.0,
            retry_max_delay=10.0,
            expired=expired,
        )
        self.one(Declare(Q, self.options))

    @rule(
        n=st.integers(1, 3),
        prio=st.sampled_from([0, 0, 0, 4, 9]),
        delay=st.sampled_from([0.0, 0.0, 0.0, 2.0, 15.0]),
        ttl=st.sampled_from([None, None, None, 5.0, 25.0]),
    )
    def publish(self, n: int, prio: int, delay: float, ttl: float | None) -> None:
        payloads = [f"m{self.next_id + i}".encode() for i in range(n)]
        assert self.one(Publish(Q, payloads, None, prio, delay, ttl)) == Published(self.next_id, n)
        now = self.now()
        for payload in payloads:
            m = Msg(self.next_id, payload, prio, now, now + ttl if ttl is not None else None)
            if delay > 0:
                m.status, m.due = "delayed", now + delay
            self.msgs[m.id] = m
            self.next_id += 1

    @rule(count=st.integers(1, 4), lease=st.sampled_from([1.0, 4.0, 100.0]))
    def fetch(self, count: int, lease: float) -> None:
        self.check_fetch(self.one(Fetch(Q, count, lease, 1)), count, lease)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), count=st.integers(1, 4))
    def ack_and_fetch_in_one_batch(self, data: st.DataObject, count: int) -> None:
        # The fetch reads committed data, where the acked messages are still present: it must not see them.
        pairs = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        acked, got = self.both(Ack(Q, pairs, 1), Fetch(Q, count, 100.0, 1))
        failed, ok = self.settle_model(pairs)
        assert acked == failed
        for m in ok:
            del self.msgs[m.id]
            self.acked += 1
        self.check_fetch(got, count, 100.0)

    @rule(prio=st.sampled_from([0, 9]), ttl=st.sampled_from([None, 5.0]), count=st.integers(1, 4))
    def publish_and_fetch_in_one_batch(self, prio: int, ttl: float | None, count: int) -> None:
        # A fetch never sees what its own batch published, ready or not.
        op = Publish(Q, [f"m{self.next_id}".encode()], None, prio, 0.0, ttl)
        published, got = self.both(op, Fetch(Q, count, 100.0, 1))
        assert published == Published(self.next_id, 1)
        self.check_fetch(got, count, 100.0)
        now = self.now()
        self.msgs[self.next_id] = Msg(self.next_id, op.payloads[0], prio, now, now + ttl if ttl is not None else None)
        self.next_id += 1

    def check_fetch(self, got: list[Delivery], count: int, lease: float) -> None:
        expected: list[Msg] = []
        for m in self.ready_order():
            if self.expired(m):
                self.expire(m)
                continue
            if self.doomed(m):
                self.dead_letter(m, "max_attempts")
                continue
            expected.append(m)
            if len(expected) >= count:
                break
        assert [(d[0], d[4], d[2]) for d in got] == [(m.id, m.payload, m.attempts + 1) for m in expected]
        for d, m in zip(got, expected, strict=True):
            assert d[1] > self.last_token  # tokens only grow, across restarts too
            self.last_token = d[1]
            m.attempts += 1
            m.status, m.token, m.deadline, m.due = "leased", d[1], self.now() + lease, 0.0
            self.held.append((m.id, d[1]))

    def settle_model(self, pairs: list[tuple[int, int]]) -> tuple[dict[int, StaleReason], list[Msg]]:
        """The leases an ack of ``pairs`` refuses, with why (every pair in ``held`` was issued for its id), and
        the messages it settles."""
        failed: dict[int, StaleReason] = {}
        ok: list[Msg] = []
        for mid, token in pairs:
            m = self.msgs.get(mid)
            if m is None or any(o is m for o in ok):  # an ack earlier in the request deleted it
                failed[mid] = StaleReason.GONE
            elif m.token > token:
                failed[mid] = StaleReason.REDELIVERED
            elif m.token != token:  # 0: settled by a nack since
                failed[mid] = StaleReason.SETTLED
            else:
                ok.append(m)
        return failed, ok

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        pairs = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        failed, ok = self.settle_model(pairs)
        assert self.one(Ack(Q, pairs, 1)) == failed
        for m in ok:
            del self.msgs[m.id]
            self.acked += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delay=st.sampled_from([None, None, 0.0, 6.0]))
    def nack(self, data: st.DataObject, delay: float | None) -> None:
        pairs = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        failed: dict[int, StaleReason] = {}
        for mid, token in pairs:  # one at a time: a nack settles, so a repeat in the request is stale
            f, ok = self.settle_model([(mid, token)])
            failed.update(f)
            for m in ok:
                self.lease_ended(m, delay, settle=True)
        assert self.one(Nack(Q, pairs, 1, delay)) == failed

    @precondition(lambda self: self.held)
    @rule(data=st.data(), lease=st.sampled_from([1.0, 50.0]))
    def touch(self, data: st.DataObject, lease: float) -> None:
        pair = data.draw(st.sampled_from(self.held))
        failed, ok = self.settle_model([pair])
        assert self.one(Touch(Q, [pair], 1, lease)) == failed
        for m in ok:
            m.status, m.deadline, m.due = "leased", self.now() + lease, 0.0

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 12.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.one(Expire())
        self.timers()

    @rule()
    def restart(self) -> None:
        self.run(self.store.close())
        self.store = self.open()
        self.acked = self.dropped = self.dead_lettered = 0
        for m in self.msgs.values():  # leases live in memory only; tokens, attempts and due times do not
            if m.status == "leased":
                m.status, m.deadline = "ready", 0.0
            elif m.status == "delayed" and m.due <= self.now():
                m.status, m.due = "ready", 0.0
        self.one(Expire())
        self.timers()

    @rule()
    def purge(self) -> None:
        gone = [m for m in self.msgs.values() if m.status != "leased"]
        assert self.one(Purge(Q)) == len(gone)
        for m in gone:
            del self.msgs[m.id]

    # ------------------------------------------------------------------------------------------- checks
    @invariant()
    def counts_agree(self) -> None:
        [s] = self.one(Stats(Q))
        by = {k: sum(m.status == k for m in self.msgs.values()) for k in ("ready", "leased", "delayed")}
        assert (s.ready, s.in_flight, s.delayed, s.total) == (by["ready"], by["leased"], by["delayed"], len(self.msgs))
        assert (s.counters["acked"], s.counters["dropped"]) == (self.acked, self.dropped)
        assert s.counters["dead_lettered"] == self.dead_lettered

    @invariant()
    def ready_order_agrees(self) -> None:
        peeked = self.one(Peek(Q, 1000))
        expected = [m for m in self.ready_order() if not self.doomed(m)]
        assert [(p[0], p[1], p[3]) for p in peeked] == [(m.id, m.attempts, m.payload) for m in expected]

    @invariant()
    def dead_letters_agree(self) -> None:
        if not self.dlq:
            return
        dead = self.one(Peek(DLQ, 1000))
        got = sorted((d[3], (d[4] or {})["replika-dead-letter-reason"]) for d in dead)
        assert got == sorted((payload, reason) for _, payload, reason in self.dlq)
        # Dead letters keep their priority: the dead-letter queue delivers them highest first.
        prio_of = {payload: prio for prio, payload, _ in self.dlq}
        prios = [prio_of[d[3]] for d in dead]
        assert prios == sorted(prios, reverse=True)


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_delivery_machine(store_space: StoreSpace) -> None:
    class Machine(DeliveryMachine):  # hypothesis makes one per example, with no arguments
        def __init__(self) -> None:
            super().__init__(store_space)

    run_state_machine_as_test(Machine, settings=SETTINGS)
