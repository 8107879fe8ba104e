"""Per-queue length and byte limits, the store-wide defaults, max_queues, and the byte accounting behind them.

Every check of ``bytes`` compares it with what the engine's storage holds, counted the slow way (each engine's
``StoreSpace.holdings`` in tests/engines.py), so a removal path that forgets to subtract (or subtracts twice) shows
up at the step that did it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replika_protocol import ErrorCode
from replika_server.store import (
    Ack,
    Declare,
    DeleteQueue,
    Delivery,
    Expire,
    Fetch,
    Nack,
    Operation,
    Publish,
    Published,
    Purge,
    QueueOptions,
    QueueStats,
    Reject,
    Release,
    Stats,
    Store,
    StoreError,
)
from tests.engines import Opener, StoreSpace
from tests.test_store import (
    ATTEMPTS,
    ID,
    LONG,
    PAYLOAD,
    SHORT,
    ack,
    counts,
    fetch,
    leases,
    let_timer_pass,
    one,
    publish,
    run,
    stats,
)
from tests.test_store import refused as refused_with


# ---------------------------------------------------------------------------------------------------- helpers
async def check_bytes(space: StoreSpace, store: Store) -> dict[str, QueueStats]:
    """Every queue's ``bytes`` and ``total`` equal what the store holds, and it holds no other queue's messages."""
    listed = await one(store, Stats(None))
    truth = space.holdings(store)
    for s in listed:
        assert (s.total, s.bytes) == truth.get(s.name, (0, 0)), s
    assert set(truth) <= {s.name for s in listed}, truth
    return {s.name: s for s in listed}


async def refused(store: Store, op: Operation[Any], code: ErrorCode = ErrorCode.QUEUE_FULL) -> StoreError:
    return await refused_with(store, op, code)


def names(err: StoreError, *words: str) -> bool:
    """Whether the error's message contains each of ``words`` as a whole word (so "5" does not match "50")."""
    found = all(re.search(rf"(?<![\w']){re.escape(w)}(?![\w'])", err.message) for w in words)
    assert found, (words, err.message)
    return found


def headers_size(headers: dict[str, str]) -> int:
    return len(msgpack.packb(headers, use_bin_type=True))


# ---------------------------------------------------------------------------------------------------- refusals
async def test_publish_past_max_length_is_refused_whole(store: Store, store_space: StoreSpace) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=3)))
    await publish(store, "jobs", b"a", b"b")
    err = await refused(store, Publish("jobs", [b"c", b"d"]))
    assert names(err, "'jobs'", "3", "2")  # the queue, its limit, what it holds
    s = (await check_bytes(store_space, store))["jobs"]
    assert (s.total, s.bytes, s.max_length, s.max_bytes) == (2, 2, 3, None)
    assert await publish(store, "jobs", b"c") == [3]  # the refused batch used no ids
    await refused(store, Publish("jobs", [b"d"]))
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"a", b"b", b"c"]


async def test_publish_past_max_bytes_is_refused_whole(store: Store, store_space: StoreSpace) -> None:
    await one(store, Declare("jobs", QueueOptions(max_bytes=10)))
    await publish(store, "jobs", b"12345")
    err = await refused(store, Publish("jobs", [b"123", b"123"]))
    assert names(err, "'jobs'", "10", "5")
    assert (await check_bytes(store_space, store))["jobs"].total == 1
    await publish(store, "jobs", b"12345")  # exactly at the limit is allowed
    await refused(store, Publish("jobs", [b"x"]))
    s = (await check_bytes(store_space, store))["jobs"]
    assert (s.total, s.bytes, s.max_bytes) == (2, 10, 10)


async def test_headers_count_toward_max_bytes(store: Store, store_space: StoreSpace) -> None:
    headers = {"trace": "abc"}
    size = 3 + headers_size(headers)
    await one(store, Declare("jobs", QueueOptions(max_bytes=2 * size)))
    await publish(store, "jobs", b"abc", headers=[headers])
    assert (await check_bytes(store_space, store))["jobs"].bytes == size
    await refused(store, Publish("jobs", [b"abc", b""], [headers, {"k": "v"}]))
    await publish(store, "jobs", b"abc", headers=[headers])
    assert (await check_bytes(store_space, store))["jobs"].bytes == 2 * size


async def test_a_refused_publish_to_a_new_queue_creates_nothing(open_store: Opener) -> None:
    store = await open_store(default_max_length=1, default_max_bytes=4)
    await refused(store, Publish("new", [b"1", b"2"]))
    await refused(store, Publish("new", [b"12345"]))
    assert await one(store, Stats(None)) == []


async def test_refusal_is_per_op_within_a_batch(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=2)))
    batch = await store.execute([Publish("jobs", [b"1"]), Publish("jobs", [b"2", b"3"]), Publish("jobs", [b"2"])])
    ok1, full, ok2 = batch.results
    assert ok1 == Published(1, 1) and ok2 == Published(2, 1)
    assert isinstance(full, StoreError) and full.code == ErrorCode.QUEUE_FULL
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"1", b"2"]


# ---------------------------------------------------------------------------------------------------- room again
@pytest.mark.parametrize("how", ["ack", "purge", "reject", "max_attempts"])
async def test_room_comes_back_when_messages_leave(store: Store, how: str, store_space: StoreSpace) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=2, max_bytes=100, max_attempts=1)))
    await publish(store, "jobs", b"1", b"2")
    await refused(store, Publish("jobs", [b"3"]))
    [d1] = await fetch(store, "jobs", max=1)
    if how == "ack":
        await ack(store, "jobs", [d1])
    elif how == "purge":
        assert await one(store, Purge("jobs")) == 1  # the leased one stays
    elif how == "reject":
        await one(store, Reject("jobs", leases([d1]), 1))
    else:
        await one(store, Release(1))  # its one attempt is spent: dead-lettered
    s = (await check_bytes(store_space, store))["jobs"]
    assert (s.total, s.bytes) == (1, 1)
    await publish(store, "jobs", b"3")
    await refused(store, Publish("jobs", [b"4"]))


async def test_requeues_are_never_refused_at_the_limit(store: Store, store_space: StoreSpace) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=2, max_bytes=2)))
    await publish(store, "jobs", b"1", b"2")
    d1, _ = await fetch(store, "jobs")
    assert await one(store, Nack("jobs", leases([d1]), 1)) == {}
    assert await run(store, Release(1)) == [None]
    assert await counts(store, "jobs") == (2, 0, 0, 2)
    assert [(d[ID], d[ATTEMPTS]) for d in await fetch(store, "jobs")] == [(1, 2), (2, 2)]
    assert (await check_bytes(store_space, store))["jobs"].bytes == 2


# ---------------------------------------------------------------------------------------------------- accounting
async def test_bytes_stay_exact_through_every_path(store: Store, store_space: StoreSpace) -> None:
    h = {"k": "v"}
    await one(store, Declare("jobs", QueueOptions(max_attempts=2)))
    await publish(store, "jobs", b"a" * 10, b"b" * 20, b"c" * 30, headers=[h, None, {"x": "yz"}])
    await publish(store, "jobs", b"d" * 40, b"e" * 50, b"f" * 60)
    assert (await check_bytes(store_space, store))["jobs"].bytes == 210 + headers_size(h) + headers_size({"x": "yz"})
    d1, d2 = await fetch(store, "jobs", max=2)  # fresh path
    await check_bytes(store_space, store)
    await one(store, Nack("jobs", leases([d1]), 1))
    # One tracked ready message and fresh ones: the general path, mixing both kinds.
    r1, d3, d4 = await fetch(store, "jobs", max=3)
    assert [r1[ID], d3[ID], d4[ID]] == [1, 3, 4]
    await check_bytes(store_space, store)
    await ack(store, "jobs", [d2, d3])  # a fresh-path and a general-path fresh delivery
    await check_bytes(store_space, store)
    await one(store, Nack("jobs", leases([d4]), 1, delay=LONG))
    await one(store, Reject("jobs", leases([r1]), 1))  # dead-lettered: jobs loses, jobs.dlq gains
    by_name = await check_bytes(store_space, store)
    assert by_name["jobs.dlq"].bytes > 10  # the payload plus the dead-letter headers
    [d5] = await fetch(store, "jobs", max=1)
    assert d5[ID] == 5
    assert await one(store, Purge("jobs")) == 2  # delayed 4 and fresh 6 go; leased 5 stays
    by_name = await check_bytes(store_space, store)
    assert (by_name["jobs"].total, by_name["jobs"].bytes) == (1, 50)
    await ack(store, "jobs", [d5])
    assert (await check_bytes(store_space, store))["jobs"].bytes == 0
    await publish(store, "jobs", b"g" * 7)
    await one(store, DeleteQueue("jobs"))
    await check_bytes(store_space, store)
    await publish(store, "jobs", b"h" * 3)
    assert (await check_bytes(store_space, store))["jobs"].bytes == 3


async def test_a_dead_letter_at_fetch_time_moves_the_bytes(store: Store, store_space: StoreSpace) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=2)))
    await publish(store, "jobs", b"12345", b"678")
    [d1] = await fetch(store, "jobs", max=1)
    await one(store, Nack("jobs", leases([d1]), 1))  # one attempt of two: ready again
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    [d2] = await fetch(store, "jobs")  # the fetch itself finds message 1 spent and dead-letters it
    assert d2[ID] == 2
    by_name = await check_bytes(store_space, store)
    assert (by_name["jobs"].bytes, by_name["jobs.dlq"].total) == (3, 1)


async def test_bytes_survive_a_reopen_and_removals_after_it_stay_exact(
    open_store: Opener, store_space: StoreSpace
) -> None:
    store = await open_store()
    await publish(store, "jobs", b"1" * 11, b"2" * 22, b"3" * 33, b"4" * 44, headers=[{"a": "b"}, None, None, None])
    _, d2, d3 = await fetch(store, "jobs", max=3)
    await one(store, Nack("jobs", leases([d2]), 1))
    await one(store, Nack("jobs", leases([d3]), 1, delay=LONG))
    before = (await check_bytes(store_space, store))["jobs"].bytes

    store = await open_store.reopen(store)

    assert (await check_bytes(store_space, store))["jobs"].bytes == before
    # Sizes of the tracked messages came from LMDB at load: each removal subtracts exactly.
    ready = await fetch(store, "jobs", max=3)
    assert [d[ID] for d in ready] == [1, 2, 4]
    await ack(store, "jobs", ready[:2])
    await check_bytes(store_space, store)
    assert await one(store, Purge("jobs")) == 1  # the delayed one
    assert (await check_bytes(store_space, store))["jobs"].bytes == 44


# ---------------------------------------------------------------------------------------------------- defaults
async def test_store_defaults_apply_unless_the_queue_overrides_them(
    open_store: Opener, store_space: StoreSpace
) -> None:
    store = await open_store(default_max_length=2, default_max_bytes=100)
    await one(store, Declare("big", QueueOptions(max_length=5, max_bytes=1000)))
    await publish(store, "plain", b"1", b"2")
    await refused(store, Publish("plain", [b"3"]))
    await publish(store, "big", *[b"x" * 150] * 5)
    await refused(store, Publish("big", [b"x"]))
    await refused(store, Publish("small", [b"x" * 101]))
    by_name = await check_bytes(store_space, store)
    assert (by_name["plain"].max_length, by_name["plain"].max_bytes) == (2, 100)
    assert (by_name["big"].max_length, by_name["big"].max_bytes) == (5, 1000)
    assert by_name["plain"].as_dict()["max_length"] == 2 and by_name["big"].as_dict()["bytes"] == 750


async def test_stats_report_no_limit_as_none(store: Store) -> None:
    await publish(store, "jobs", b"12")
    d = (await stats(store, "jobs")).as_dict()
    assert (d["bytes"], d["max_length"], d["max_bytes"]) == (2, None, None)


async def test_limits_survive_a_reopen_and_declare_updates_them(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(max_attempts=3, max_length=2, max_bytes=50)))
    store = await open_store.reopen(store)
    s = await stats(store, "jobs")
    assert (s.max_attempts, s.max_length, s.max_bytes) == (3, 2, 50)
    await publish(store, "jobs", b"1", b"2")
    await refused(store, Publish("jobs", [b"3"]))
    await one(store, Declare("jobs", QueueOptions(max_length=3)))
    store = await open_store.reopen(store, default_max_bytes=7)
    s = await stats(store, "jobs")
    assert (s.max_attempts, s.max_length, s.max_bytes) == (None, 3, 7)
    await publish(store, "jobs", b"3")
    await refused(store, Publish("jobs", [b"4"]))


# ---------------------------------------------------------------------------------------------------- max_queues
@pytest.mark.parametrize("op", ["declare", "publish", "fetch"])
async def test_too_many_queues_refuses_a_new_queue(open_store: Opener, op: str) -> None:
    store = await open_store(max_queues=2)
    await one(store, Declare("a", QueueOptions()))
    await publish(store, "b", b"1")
    ops: dict[str, Operation[Any]] = {
        "declare": Declare("c", QueueOptions()),
        "publish": Publish("c", [b"1"]),
        "fetch": Fetch("c", 1, LONG, 1),
    }
    new = ops[op]
    err = await refused(store, new, ErrorCode.TOO_MANY_QUEUES)
    assert names(err, "'c'", "2")
    assert sorted(s.name for s in await one(store, Stats(None))) == ["a", "b"]
    await publish(store, "a", b"still fine")  # existing queues are unaffected
    await one(store, DeleteQueue("b"))
    [made] = await run(store, new)
    assert not isinstance(made, StoreError), made  # deleting one made room
    assert sorted(s.name for s in await one(store, Stats(None))) == ["a", "c"]


async def test_dead_letter_queues_are_exempt_from_max_queues_and_limits(
    open_store: Opener, store_space: StoreSpace
) -> None:
    store = await open_store(max_queues=2, default_max_length=1)
    await one(store, Declare("jobs", QueueOptions(max_length=2)))
    await one(store, Declare("graves", QueueOptions()))
    await publish(store, "jobs", b"1", b"2")
    await one(store, Reject("jobs", leases(await fetch(store, "jobs")), 1))  # creates jobs.dlq: a third queue
    by_name = await check_bytes(store_space, store)
    assert by_name["jobs.dlq"].total == 2  # past its default max_length of 1: never lose a message
    await refused(store, Publish("jobs.dlq", [b"3"]))  # a client's publish is still held to it
    await refused(store, Declare("more", QueueOptions()), ErrorCode.TOO_MANY_QUEUES)


# ---------------------------------------------------------------------------------------------------- property
async def _random_run(
    space: StoreSpace, url: str, steps: list[tuple[str, int, int]], max_length: int, max_bytes: int
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    opener = Opener(url)
    store = await opener()
    try:
        await one(store, Declare("q", QueueOptions(max_attempts=3, max_length=max_length, max_bytes=max_bytes)))
        held: list[Delivery] = []
        for step, a, b in steps:
            if step == "publish":
                payloads = [bytes([65 + i]) * (a + i) for i in range(b)]
                headers: list[dict[str, str] | None] | None = [{"h": "v" * i} if i % 2 else None for i in range(b)]
                await run(store, Publish("q", payloads, headers if a % 2 else None))  # QUEUE_FULL at times
            elif step == "fetch":
                held += await one(store, Fetch("q", a, LONG, 1))
            elif step in ("ack", "nack", "reject"):
                done, held = held[:a], held[a:]
                settle = Ack if step == "ack" else Nack if step == "nack" else Reject
                await one(store, settle("q", leases(done), 1))
            elif step == "release":
                await one(store, Release(1))
            elif step == "purge":
                await one(store, Purge("q"))
            elif step == "reopen":
                store = await opener.reopen(store)
                held = []
            await check_bytes(space, store)
        # However the queue got here, emptying it brings its figures back to zero.
        await run(store, Release(1), Purge("q"))
        s = await stats(store, "q")
        assert (s.total, s.bytes) == (0, 0), s
    finally:
        await opener.close()
    assert not errors, errors


# Weighted towards the steps that add and hand out messages, so that most settles find leases to act on.
_kinds = ["publish"] * 3 + ["fetch"] * 3 + ["ack"] * 2 + ["nack", "reject", "release", "purge", "reopen"]
_steps = st.lists(st.tuples(st.sampled_from(_kinds), st.integers(1, 6), st.integers(1, 4)), min_size=10, max_size=40)


# The space is shared by the examples on purpose: each opens a store of its own from it (and drops it after).
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(_steps, st.integers(4, 30), st.integers(40, 400))
def test_bytes_match_what_is_stored_after_any_sequence(
    store_space: StoreSpace, steps: list[tuple[str, int, int]], max_length: int, max_bytes: int
) -> None:
    # A synchronous test with a loop of its own per example: pytest-asyncio's loop is per test, not per example.
    url = store_space.new()
    try:
        uvloop.run(_random_run(store_space, url, steps, max_length, max_bytes))
    finally:
        store_space.drop(url)


# ---------------------------------------------------------------------------------------------------- counters
async def test_counters_count_each_event_once(store: Store) -> None:
    await one(store, Declare("c", QueueOptions(max_attempts=2)))
    await publish(store, "c", b"1", b"2", b"3", b"4")
    first = await fetch(store, "c", max=4, lease=SHORT)
    await ack(store, "c", first[:1])
    await one(store, Nack("c", leases(first[1:2]), 1))
    await one(store, Reject("c", leases(first[2:3]), 1))
    let_timer_pass(store)  # the fourth lease ends at its deadline
    await one(store, Expire())
    again = await fetch(store, "c", max=4)  # the nacked and the expired one, second attempts
    await one(store, Release(1))  # their connection goes: ended leases at max_attempts move to the DLQ
    c = (await stats(store, "c")).counters
    assert c == {
        "published": 4,
        "delivered": 4 + len(again),
        "acked": 1,
        "nacked": 1,
        "expired": 3,
        "dead_lettered": 3,
        "dropped": 0,
        "deduplicated": 0,
    }
    assert len(again) == 2
    dlq = (await stats(store, "c.dlq")).counters
    assert dlq["published"] == 0 and (await stats(store, "c.dlq")).total == 3
