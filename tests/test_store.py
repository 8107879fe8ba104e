"""The store contract: batches of ops in, results out, leases, dead letters, and what survives a reopen.

Every test here and in the other store contract modules (test_store_features, test_store_limits, the state
machine) sees only the :class:`Store` interface and runs once per engine (the ``store`` and ``open_store`` fixtures;
tests/engines.py lists the engines). Stores run on a manual clock: a lease, a delay or a TTL ends when a test moves
the clock past it, never by waiting for real time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, TypeVar, cast

import pytest

from replika_protocol import ErrorCode
from replika_server.store import (
    Ack,
    BatchResult,
    Declare,
    DeleteQueue,
    Delivery,
    Expire,
    Fetch,
    Nack,
    Op,
    Operation,
    Publish,
    Published,
    Purge,
    QueueOptions,
    QueueStats,
    Reject,
    Release,
    Result,
    Settled,
    StaleReason,
    Stats,
    Store,
    StoreError,
    Touch,
)
from replika_server.store._queue import GRANTS_KEPT
from tests.clock import ManualClock
from tests.conftest import WAIT
from tests.engines import LmdbOpener, Opener

# Positions in a Delivery tuple.
ID: Final = 0
TOKEN: Final = 1
ATTEMPTS: Final = 2
PUBLISHED_AT: Final = 3
PAYLOAD: Final = 4
HEADERS: Final = 5

# Seconds. A lease or delay that a test lets end by moving the clock, and one that no test outlives.
SHORT = 5.0
LONG = 3600.0
#: Seconds past a due time that the clock is moved, so that the time is past it and not exactly at it.
TICK = 0.001

DLQ_QUEUE = "replika-dead-letter-queue"
DLQ_REASON = "replika-dead-letter-reason"
DLQ_ID = "replika-dead-letter-id"
DLQ_ATTEMPTS = "replika-dead-letter-attempts"

MIB = 1024 * 1024

R = TypeVar("R")
R2 = TypeVar("R2")


# ---------------------------------------------------------------------------------------------------- helpers
async def _alone(store: Store, op: Operation[R]) -> R | StoreError:
    batch = await asyncio.wait_for(store.execute([cast(Op, op)]), WAIT)
    [result] = batch.results
    return cast("R | StoreError", result)


async def execute(store: Store, *ops: Operation[Any]) -> BatchResult:
    """Run one batch, then check the counting invariant of every queue."""
    batch = await asyncio.wait_for(store.execute(cast("Sequence[Op]", ops)), WAIT)
    assert len(batch.results) == len(ops)
    all_stats = await _alone(store, Stats(None))
    assert not isinstance(all_stats, StoreError), all_stats
    for s in all_stats:
        assert min(s.ready, s.in_flight, s.delayed, s.total) >= 0, s
        assert s.ready + s.in_flight + s.delayed == s.total, s
    return batch


async def run(store: Store, *ops: Operation[Any]) -> list[Result | StoreError]:
    return (await execute(store, *ops)).results


async def one(store: Store, op: Operation[R]) -> R:
    """The result of ``op`` run alone, which must not be an error (see :func:`refused`)."""
    [result] = await run(store, op)
    assert not isinstance(result, StoreError), result
    return cast(R, result)


async def both(store: Store, first: Operation[R], second: Operation[R2]) -> tuple[R, R2]:
    """The results of ``first`` and ``second`` run in one batch, neither of which may be an error."""
    a, b = await run(store, first, second)
    assert not isinstance(a, StoreError) and not isinstance(b, StoreError), (a, b)
    return cast(R, a), cast(R2, b)


async def refused(store: Store, op: Operation[Any], code: ErrorCode) -> StoreError:
    """The error ``op`` run alone fails with, which must have ``code``."""
    [result] = await run(store, op)
    assert isinstance(result, StoreError), result
    assert result.code == code, result
    return result


async def publish(
    store: Store, queue: str, *payloads: bytes, headers: list[dict[str, str] | None] | None = None
) -> list[int]:
    result = await one(store, Publish(queue, list(payloads), headers))
    assert result.count == len(payloads), result
    return list(range(result.first_id, result.first_id + result.count))


async def fetch(store: Store, queue: str, max: int = 100, lease: float = LONG, owner: int = 1) -> list[Delivery]:
    return await one(store, Fetch(queue, max, lease, owner))


def leases(deliveries: list[Delivery]) -> list[tuple[int, int]]:
    return [(d[ID], d[TOKEN]) for d in deliveries]


async def ack(store: Store, queue: str, deliveries: list[Delivery], owner: int = 1) -> Settled:
    return await one(store, Ack(queue, leases(deliveries), owner))


async def stats(store: Store, queue: str) -> QueueStats:
    [s] = await one(store, Stats(queue))
    return s


async def counts(store: Store, queue: str) -> tuple[int, int, int, int]:
    """(ready, in_flight, delayed, total)."""
    s = await stats(store, queue)
    return s.ready, s.in_flight, s.delayed, s.total


def clock_of(store: Store) -> ManualClock:
    clock = store.clock
    assert isinstance(clock, ManualClock), "store tests run on a manual clock (StoreOptions.clock)"
    return clock


def let_timer_pass(store: Store) -> None:
    """Move the store's clock just past its next timer (a lease deadline, a due time, a TTL's end)."""
    timer = store.next_timer()
    assert timer is not None, "the store has no timer to let pass"
    clock = clock_of(store)
    clock.advance(max(timer - clock.monotonic(), 0.0) + TICK)


def let_time_pass(store: Store, seconds: float) -> None:
    """Move the store's clock just past ``seconds`` from now."""
    clock_of(store).advance(seconds + TICK)


# ---------------------------------------------------------------------------------------------------- publish
async def test_publish_returns_first_id_and_count(store: Store) -> None:
    assert await one(store, Publish("jobs", [b"a", b"b", b"c"])) == Published(1, 3)
    assert await one(store, Publish("jobs", [b"d"])) == Published(4, 1)
    assert await one(store, Publish("other", [b"x", b"y"])) == Published(1, 2)  # ids are per queue


async def test_ids_increase_across_batches_and_within_one(store: Store) -> None:
    results = await run(store, Publish("jobs", [b"1", b"2"]), Publish("jobs", [b"3"]))
    assert results == [Published(1, 2), Published(3, 1)]
    ids = await publish(store, "jobs", b"4")
    assert ids == [4]
    await ack(store, "jobs", await fetch(store, "jobs"))
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await publish(store, "jobs", b"5") == [5]  # an emptied queue does not reuse ids


async def test_publish_reports_the_queue_as_readied(store: Store) -> None:
    batch = await execute(store, Publish("jobs", [b"a"]))
    assert "jobs" in batch.readied


# ---------------------------------------------------------------------------------------------------- fetch
async def test_fetch_is_fifo_and_honours_max(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2", b"3")
    await publish(store, "jobs", b"4", b"5")
    first = await fetch(store, "jobs", max=2)
    assert [(d[ID], d[PAYLOAD], d[ATTEMPTS]) for d in first] == [(1, b"1", 1), (2, b"2", 1)]
    rest = await fetch(store, "jobs", max=10)
    assert [d[ID] for d in rest] == [3, 4, 5]
    assert await fetch(store, "jobs") == []
    assert await counts(store, "jobs") == (0, 5, 0, 5)
    tokens = [d[TOKEN] for d in first + rest]
    assert len(set(tokens)) == 5


async def test_tokens_grow_within_a_fetch_that_skips_messages(store: Store) -> None:
    await one(store, Publish("jobs", [b"later"], delay=LONG))  # id 1, not ready: the fetch skips it
    await publish(store, "jobs", b"a", b"b", b"c")
    tokens = [d[TOKEN] for d in await fetch(store, "jobs")]
    assert len(tokens) == 3 and tokens == sorted(set(tokens)) and tokens[0] > 0


async def test_delivery_fields(store: Store) -> None:
    await publish(store, "jobs", b"\x00\xffbinary")
    published = clock_of(store).time()
    let_time_pass(store, 1.0)
    [d] = await fetch(store, "jobs")
    assert d[ID] == 1 and d[ATTEMPTS] == 1 and d[PAYLOAD] == b"\x00\xffbinary"
    assert isinstance(d[PAYLOAD], bytes)
    assert d[PUBLISHED_AT] == published  # the store's clock (unix seconds) when it was published
    assert not d[HEADERS]


async def test_fetch_creates_the_queue(store: Store) -> None:
    assert await fetch(store, "fresh") == []
    assert await counts(store, "fresh") == (0, 0, 0, 0)


async def test_fetch_does_not_see_a_publish_of_the_same_batch(store: Store) -> None:
    results = await run(store, Publish("jobs", [b"a"]), Fetch("jobs", 10, LONG, 1))
    assert results == [Published(1, 1), []]
    [d] = await fetch(store, "jobs")
    assert d[PAYLOAD] == b"a"


async def test_fetch_in_a_publish_batch_sees_only_what_was_committed_before(store: Store) -> None:
    await publish(store, "jobs", b"old")
    _, fetched = await both(store, Publish("jobs", [b"new"]), Fetch("jobs", 10, LONG, 1))
    assert [d[PAYLOAD] for d in fetched] == [b"old"]
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"new"]


# ---------------------------------------------------------------------------------------------------- ack
async def test_ack_removes(store: Store) -> None:
    await publish(store, "jobs", b"a", b"b")
    ds = await fetch(store, "jobs", max=1)
    assert await counts(store, "jobs") == (1, 1, 0, 2)
    assert await ack(store, "jobs", ds) == {}
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [d] = await fetch(store, "jobs")
    assert d[PAYLOAD] == b"b"


async def test_ack_with_wrong_token_is_stale_and_changes_nothing(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    assert await one(store, Ack("jobs", [(d[ID], d[TOKEN] + 1000)], 1)) == {d[ID]: StaleReason.UNKNOWN}
    assert await one(store, Ack("jobs", [(99, d[TOKEN])], 1)) == {99: StaleReason.GONE}
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [d]) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)


async def test_second_ack_is_stale(store: Store) -> None:
    await publish(store, "jobs", b"a")
    ds = await fetch(store, "jobs")
    assert await ack(store, "jobs", ds) == {}
    assert await ack(store, "jobs", ds) == {ds[0][ID]: StaleReason.GONE}
    # Twice in one batch: the first applies, the second is stale.
    await publish(store, "jobs", b"b")
    ds = await fetch(store, "jobs")
    results = await run(store, Ack("jobs", leases(ds), 1), Ack("jobs", leases(ds), 1))
    assert results == [{}, {ds[0][ID]: StaleReason.GONE}]


async def test_ack_reports_only_the_failed_leases(store: Store) -> None:
    await publish(store, "jobs", b"a", b"b", b"c")
    ds = await fetch(store, "jobs")
    mixed = [(ds[0][ID], ds[0][TOKEN]), (ds[1][ID], ds[1][TOKEN] + 1000), (ds[2][ID], ds[2][TOKEN])]
    assert await one(store, Ack("jobs", mixed, 1)) == {ds[1][ID]: StaleReason.UNKNOWN}
    assert await counts(store, "jobs") == (0, 1, 0, 1)


# ---------------------------------------------------------------------------------------------------- leases
async def test_expired_lease_not_yet_redelivered_can_still_be_acked(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs", lease=SHORT)
    let_timer_pass(store)
    batch = await execute(store, Expire())
    assert "jobs" in batch.readied
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    assert await ack(store, "jobs", [d]) == {}  # the work was done; the ack counts
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await fetch(store, "jobs") == []


async def test_after_expiry_and_redelivery_the_old_token_is_stale(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [old] = await fetch(store, "jobs", lease=SHORT)
    let_timer_pass(store)
    await run(store, Expire())
    [new] = await fetch(store, "jobs")
    assert (new[ID], new[PAYLOAD], new[ATTEMPTS]) == (old[ID], b"a", 2)
    assert new[TOKEN] != old[TOKEN]
    stale = {old[ID]: StaleReason.REDELIVERED}
    assert await ack(store, "jobs", [old]) == stale
    assert await one(store, Nack("jobs", leases([old]), 1)) == stale
    assert await one(store, Reject("jobs", leases([old]), 1)) == stale
    assert await one(store, Touch("jobs", leases([old]), 1, lease=LONG)) == stale
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [new]) == {}


async def test_expire_leaves_unexpired_leases_alone(store: Store) -> None:
    await publish(store, "jobs", b"short", b"long")
    [short] = await fetch(store, "jobs", max=1, lease=SHORT)
    [long] = await fetch(store, "jobs", max=1, lease=LONG)
    let_timer_pass(store)
    await run(store, Expire())
    assert await counts(store, "jobs") == (1, 1, 0, 2)
    [again] = await fetch(store, "jobs")
    assert again[ID] == short[ID]
    assert await ack(store, "jobs", [long, again]) == {}


async def test_touch_extends_a_lease(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs", lease=SHORT)
    assert await one(store, Touch("jobs", leases([d]), 1, lease=LONG)) == {}
    let_time_pass(store, SHORT)  # past the original deadline
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [d]) == {}


async def test_release_makes_an_owners_leases_ready_with_attempts_counted(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2", b"3")
    mine = await fetch(store, "jobs", max=2, owner=1)
    theirs = await fetch(store, "jobs", max=1, owner=2)
    batch = await execute(store, Release(1))
    assert batch.results == [None]
    assert "jobs" in batch.readied
    assert await counts(store, "jobs") == (2, 1, 0, 3)
    again = await fetch(store, "jobs", owner=3)
    assert [(d[ID], d[ATTEMPTS]) for d in again] == [(1, 2), (2, 2)]
    assert await ack(store, "jobs", mine) == {1: StaleReason.REDELIVERED, 2: StaleReason.REDELIVERED}
    assert await ack(store, "jobs", theirs, owner=2) == {}  # another owner's lease is untouched
    assert await ack(store, "jobs", again, owner=3) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)


async def test_release_of_an_owner_without_leases_is_a_no_op(store: Store) -> None:
    await publish(store, "jobs", b"a")
    ds = await fetch(store, "jobs", owner=1)
    assert await run(store, Release(42)) == [None]
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", ds) == {}


# ---------------------------------------------------------------------------------------------------- nack
async def test_nack_without_delay_makes_the_message_ready_again_in_fifo_order(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2")
    [first] = await fetch(store, "jobs", max=1)
    batch = await execute(store, Nack("jobs", leases([first]), 1))
    assert batch.results == [{}]
    assert "jobs" in batch.readied
    assert await counts(store, "jobs") == (2, 0, 0, 2)
    ds = await fetch(store, "jobs")
    assert [(d[ID], d[ATTEMPTS]) for d in ds] == [(1, 2), (2, 1)]
    assert ds[0][TOKEN] != first[TOKEN]


async def test_nack_with_delay_is_delayed_then_ready_once_due(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    assert await one(store, Nack("jobs", leases([d]), 1, delay=SHORT)) == {}
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    assert await fetch(store, "jobs") == []  # only Expire makes a due message ready
    let_timer_pass(store)
    batch = await execute(store, Expire())
    assert "jobs" in batch.readied
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[ATTEMPTS]) == (d[ID], 2)


async def test_a_long_delay_is_not_ended_by_expire(store: Store) -> None:
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    await one(store, Nack("jobs", leases([d]), 1, delay=LONG))
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    assert await fetch(store, "jobs") == []


# ---------------------------------------------------------------------------------------------------- dead letters
async def test_reject_dead_letters_at_once_with_headers(store: Store) -> None:
    await publish(store, "jobs", b"payload", headers=[{"trace": "abc"}])
    [d] = await fetch(store, "jobs")
    batch = await execute(store, Reject("jobs", leases([d]), 1))
    assert batch.results == [{}]
    assert "jobs.dlq" in batch.readied
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await counts(store, "jobs.dlq") == (1, 0, 0, 1)
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[PAYLOAD] == b"payload"
    assert dead[ATTEMPTS] == 1
    assert dead[HEADERS] == {
        "trace": "abc",
        DLQ_QUEUE: "jobs",
        DLQ_REASON: "rejected",
        DLQ_ID: str(d[ID]),
        DLQ_ATTEMPTS: "1",
    }
    assert await ack(store, "jobs", [d]) == {d[ID]: StaleReason.GONE}


async def test_max_attempts_then_nack_dead_letters(store: Store) -> None:
    assert await run(store, Declare("jobs", QueueOptions(max_attempts=2))) == [None]
    await publish(store, "jobs", b"flaky")
    [d1] = await fetch(store, "jobs")
    assert await one(store, Nack("jobs", leases([d1]), 1)) == {}
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [d2] = await fetch(store, "jobs")
    assert d2[ATTEMPTS] == 2
    assert await one(store, Nack("jobs", leases([d2]), 1)) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[PAYLOAD] == b"flaky"
    assert dead[HEADERS] is not None
    assert dead[HEADERS][DLQ_QUEUE] == "jobs"
    assert dead[HEADERS][DLQ_REASON] == "max_attempts"
    assert dead[HEADERS][DLQ_ID] == str(d1[ID])
    assert dead[HEADERS][DLQ_ATTEMPTS] == "2"


async def test_max_attempts_then_nack_with_delay_dead_letters(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    assert await one(store, Nack("jobs", leases([d]), 1, delay=LONG)) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[HEADERS] is not None and dead[HEADERS][DLQ_REASON] == "max_attempts"


async def test_max_attempts_then_lease_expiry_dead_letters(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    await publish(store, "jobs", b"a")
    await fetch(store, "jobs", lease=SHORT)
    let_timer_pass(store)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[PAYLOAD] == b"a"
    assert dead[HEADERS] is not None
    assert (dead[HEADERS][DLQ_REASON], dead[HEADERS][DLQ_ATTEMPTS]) == ("max_attempts", "1")


async def test_max_attempts_then_release_dead_letters(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    await publish(store, "jobs", b"a")
    await fetch(store, "jobs", owner=7)
    await run(store, Release(7))
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await counts(store, "jobs.dlq") == (1, 0, 0, 1)


async def test_custom_dead_letter_queue(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(dead_letter="graveyard")))
    assert (await stats(store, "jobs")).dead_letter == "graveyard"
    await publish(store, "jobs", b"a")
    await one(store, Reject("jobs", leases(await fetch(store, "jobs")), 1))
    [dead] = await fetch(store, "graveyard")
    assert dead[PAYLOAD] == b"a"
    assert dead[HEADERS] is not None and dead[HEADERS][DLQ_QUEUE] == "jobs"
    await refused(store, Stats("jobs.dlq"), ErrorCode.NOT_FOUND)


async def test_declare_is_idempotent_and_updates_options(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=3)))
    await publish(store, "jobs", b"a")
    await one(store, Declare("jobs", QueueOptions(max_attempts=3)))
    s = await stats(store, "jobs")
    assert (s.max_attempts, s.dead_letter, s.total) == (3, "jobs.dlq", 1)
    await one(store, Declare("jobs", QueueOptions(max_attempts=5, dead_letter="elsewhere")))
    s = await stats(store, "jobs")
    assert (s.max_attempts, s.dead_letter, s.total) == (5, "elsewhere", 1)


# ---------------------------------------------------------------------------------------------------- purge, delete
async def test_purge_removes_ready_and_delayed_but_keeps_leased(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2", b"3", b"4", b"5", b"6")
    leased, nacked, delayed = await fetch(store, "jobs", max=3)
    await run(store, Nack("jobs", leases([nacked]), 1), Nack("jobs", leases([delayed]), 1, delay=LONG))
    assert await counts(store, "jobs") == (4, 1, 1, 6)
    assert await one(store, Purge("jobs")) == 5
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await fetch(store, "jobs") == []
    await run(store, Expire())
    assert await fetch(store, "jobs") == []
    assert await ack(store, "jobs", [leased]) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await publish(store, "jobs", b"7") == [7]
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"7"]


async def test_purge_keeps_a_leased_message_that_later_expires(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2")
    [leased] = await fetch(store, "jobs", max=1, lease=SHORT)
    assert await one(store, Purge("jobs")) == 1
    let_timer_pass(store)
    await run(store, Expire())
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[PAYLOAD], again[ATTEMPTS]) == (leased[ID], b"1", 2)


async def test_purge_of_a_missing_queue_is_not_found(store: Store) -> None:
    await refused(store, Purge("nope"), ErrorCode.NOT_FOUND)


async def test_delete_queue_then_ack_is_not_found(store: Store) -> None:
    await publish(store, "jobs", b"a", b"b")
    ds = await fetch(store, "jobs", max=1)
    assert await run(store, DeleteQueue("jobs")) == [None]
    await refused(store, Ack("jobs", leases(ds), 1), ErrorCode.NOT_FOUND)
    await refused(store, Stats("jobs"), ErrorCode.NOT_FOUND)
    assert [s.name for s in await one(store, Stats(None))] == []
    await refused(store, DeleteQueue("jobs"), ErrorCode.NOT_FOUND)


async def test_errors_are_per_op_and_do_not_fail_the_batch(store: Store) -> None:
    results = await run(store, Stats("missing"), Publish("jobs", [b"a"]), Purge("missing"))
    assert isinstance(results[0], StoreError) and results[0].code == ErrorCode.NOT_FOUND
    assert results[1] == Published(1, 1)
    assert isinstance(results[2], StoreError) and results[2].code == ErrorCode.NOT_FOUND


async def test_a_recreated_queue_does_not_accept_the_old_queues_leases(store: Store) -> None:
    await publish(store, "jobs", b"old")
    [old] = await fetch(store, "jobs")
    await one(store, DeleteQueue("jobs"))
    await run(store, Expire())
    await publish(store, "jobs", b"new")
    [new] = await fetch(store, "jobs")
    assert new[PAYLOAD] == b"new"
    assert await ack(store, "jobs", [old]) == {old[ID]: StaleReason.REDELIVERED}
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [new]) == {}


# ---------------------------------------------------------------------------------------------------- stats, headers
async def test_stats_none_lists_every_queue(store: Store) -> None:
    assert await one(store, Stats(None)) == []
    await publish(store, "b", b"1", b"2")
    await publish(store, "a", b"1")
    await one(store, Declare("c", QueueOptions(max_attempts=4, dead_letter="c-dead")))
    await fetch(store, "b", max=1)
    listed = await one(store, Stats(None))
    assert sorted(s.name for s in listed) == ["a", "b", "c"]
    by_name = {s.name: s for s in listed}
    assert by_name["b"].as_dict() == {
        "queue": "b",
        "ready": 1,
        "in_flight": 1,
        "delayed": 0,
        "total": 2,
        "max_attempts": None,
        "dead_letter": "b.dlq",
        "bytes": 2,
        "max_length": None,
        "max_bytes": None,
        "overflow": "reject",
        "retry_delay": 0.0,
        "retry_backoff": 2.0,
        "retry_max_delay": None,
        "message_ttl": None,
        "expired": "dead_letter",
        "dedup_window": 120.0,
        "history": None,
        "bindings": [],
        "counters": {
            "published": 2,
            "delivered": 1,
            "acked": 0,
            "nacked": 0,
            "expired": 0,
            "dead_lettered": 0,
            "dropped": 0,
            "deduplicated": 0,
        },
    }
    assert (by_name["c"].max_attempts, by_name["c"].dead_letter, by_name["c"].total) == (4, "c-dead", 0)


async def test_headers_round_trip(store: Store) -> None:
    headers: list[dict[str, str] | None] = [{"trace": "abc", "kind": "demo"}, None, {"ключ": "значение ✓", "": ""}]
    await publish(store, "jobs", b"1", b"2", b"3", headers=headers)
    ds = await fetch(store, "jobs")
    assert [d[HEADERS] for d in ds] == headers


# ---------------------------------------------------------------------------------------------------- reopen
async def test_reopen_keeps_messages_options_ids_and_requeues_leases(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("opts", QueueOptions(max_attempts=3, dead_letter="opts-dead")))
    await publish(store, "jobs", b"1", b"2", b"3", headers=[{"h": "1"}, None, None])
    await publish(store, "jobs", b"4", b"5")
    d1, d2, d3 = await fetch(store, "jobs", max=3)
    await ack(store, "jobs", [d1])
    await one(store, Nack("jobs", leases([d2]), 1))  # ready again, attempts 1 so far
    [d2b] = await fetch(store, "jobs", max=1)  # attempts 2, leased at close
    assert (d2b[ID], d2b[ATTEMPTS]) == (2, 2)
    await one(store, Nack("jobs", leases([d3]), 1, delay=LONG))
    assert await counts(store, "jobs") == (2, 1, 1, 4)

    store = await open_store.reopen(store)

    assert await counts(store, "jobs") == (3, 0, 1, 4)  # the lease did not survive; the message did
    opts = await stats(store, "opts")
    assert (opts.max_attempts, opts.dead_letter) == (3, "opts-dead")
    ds = await fetch(store, "jobs")
    assert [(d[ID], d[PAYLOAD], d[ATTEMPTS]) for d in ds] == [(2, b"2", 3), (4, b"4", 1), (5, b"5", 1)]
    assert ds[0][PUBLISHED_AT] == d2b[PUBLISHED_AT]
    assert await ack(store, "jobs", [d2b]) == {2: StaleReason.REDELIVERED}
    assert await publish(store, "jobs", b"6") == [6]
    assert await counts(store, "jobs") == (1, 3, 1, 5)


async def test_reopen_keeps_headers_and_published_at(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", b"a", headers=[{"k": "v"}])
    [before] = await fetch(store, "jobs")
    store = await open_store.reopen(store)
    [after] = await fetch(store, "jobs")
    assert (after[PAYLOAD], after[HEADERS], after[PUBLISHED_AT]) == (b"a", {"k": "v"}, before[PUBLISHED_AT])
    assert after[ATTEMPTS] == 2


async def test_reopen_keeps_a_future_due_time(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", b"a")
    await one(store, Nack("jobs", leases(await fetch(store, "jobs")), 1, delay=LONG))
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    await run(store, Expire())
    assert await fetch(store, "jobs") == []
    timer = store.next_timer()
    assert timer is not None and timer > open_store.clock.monotonic() + LONG / 2  # on the monotonic scale


async def test_reopen_makes_a_delay_that_passed_while_closed_ready(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    await one(store, Nack("jobs", leases([d]), 1, delay=SHORT))
    await store.close()
    open_store.clock.advance(SHORT + TICK)
    store = await open_store()
    await run(store, Expire())
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[ATTEMPTS]) == (d[ID], 2)


async def test_tokens_are_never_reused_across_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", *[b"%d" % i for i in range(5)])
    await publish(store, "other", b"x")
    first = await fetch(store, "jobs", max=3) + await fetch(store, "other")
    store = await open_store.reopen(store)
    second = await fetch(store, "jobs") + await fetch(store, "other")
    old = {d[TOKEN] for d in first}
    new = {d[TOKEN] for d in second}
    assert len(second) == 6
    assert not old & new
    assert min(new) > max(old)
    for d in first:
        result = await one(store, Ack("jobs" if d[PAYLOAD] != b"x" else "other", leases([d]), 1))
        assert result == {d[ID]: StaleReason.REDELIVERED}


@pytest.mark.parametrize("how", ["nack", "nack-delay", "release", "expire"])
async def test_a_tokens_validity_does_not_change_across_a_reopen(open_store: Opener, how: str) -> None:
    # Two messages in the same state: one old token is tried before the reopen, its twin after. Whether a token
    # stays current after its lease ended this way is the engine's rule; a restart must not change the answer.
    store = await open_store()
    await publish(store, "jobs", b"a", b"b")
    twins = await fetch(store, "jobs", lease=SHORT if how == "expire" else LONG, owner=5)
    if how == "nack":
        await one(store, Nack("jobs", leases(twins), 5))
    elif how == "nack-delay":
        await one(store, Nack("jobs", leases(twins), 5, delay=LONG))
    elif how == "release":
        await run(store, Release(5))
    else:
        let_timer_pass(store)
        await run(store, Expire())
    first, second = twins
    before = await ack(store, "jobs", [first])
    store = await open_store.reopen(store)
    after = await ack(store, "jobs", [second])
    assert before in ({}, {first[ID]: StaleReason.SETTLED})
    assert after == ({} if before == {} else {second[ID]: StaleReason.SETTLED})


async def test_many_fetches_in_flight_keep_attempts_and_tokens_across_a_reopen(open_store: Opener) -> None:
    # More fetches than the LMDB engine keeps grants for (its first deliveries' records, GRANTS_KEPT), with
    # gaps: acked, nacked and released messages among them, and a delayed one that the fetches skip.
    store = await open_store()
    await publish(store, "jobs", *[b"%d" % i for i in range(39)])
    await one(store, Publish("jobs", [b"later"], delay=LONG))
    batches = [await fetch(store, "jobs", max=1 + i % 3, owner=7) for i in range(20)]  # 1, 2, 3, 1, ...: 39
    delivered = [d for batch in batches for d in batch]
    assert len(delivered) == 39 and len({d[TOKEN] for d in delivered}) == 39
    acked, nacked, kept = delivered[:10], delivered[10:15], delivered[15:]
    assert await ack(store, "jobs", acked, owner=7) == {}
    await one(store, Nack("jobs", leases(nacked), 7))
    await run(store, Release(7))
    assert await counts(store, "jobs") == (29, 0, 1, 30)

    store = await open_store.reopen(store)

    assert await counts(store, "jobs") == (29, 0, 1, 30)
    assert await ack(store, "jobs", kept[:5]) == {}  # their tokens are still current
    assert await ack(store, "jobs", nacked[:1]) == {nacked[0][ID]: StaleReason.SETTLED}
    again = await fetch(store, "jobs")
    assert [(d[ID], d[ATTEMPTS]) for d in again] == sorted(
        [(d[ID], 2) for d in nacked] + [(d[ID], 2) for d in kept[5:]]
    )
    assert min(d[TOKEN] for d in again) > max(d[TOKEN] for d in delivered)
    assert await ack(store, "jobs", kept[5:6]) == {kept[5][ID]: StaleReason.REDELIVERED}
    assert await ack(store, "jobs", again) == {}
    assert await counts(store, "jobs") == (0, 0, 1, 1)


async def test_first_deliveries_of_a_backlog_survive_a_reopen_leased_or_not(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", *[b"%d" % i for i in range(300)])
    first = await fetch(store, "jobs", max=200)
    second = await fetch(store, "jobs", max=50)
    assert await ack(store, "jobs", first[:150]) == {}
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (150, 0, 0, 150)
    rest = await fetch(store, "jobs", max=1000)
    attempts = {d[ID]: d[ATTEMPTS] for d in rest}
    assert [attempts[d[ID]] for d in first[150:] + second] == [2] * 100
    assert sorted(attempts.values()).count(1) == 50  # never delivered before the reopen
    assert await ack(store, "jobs", rest) == {}


async def test_the_lmdb_queue_record_keeps_a_bounded_number_of_grants(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb()
    await publish(store, "jobs", *[b"%d" % i for i in range(3 * GRANTS_KEPT)])
    for _ in range(3 * GRANTS_KEPT):
        await fetch(store, "jobs", max=1)
        assert len(store._queues["jobs"].grants) <= GRANTS_KEPT
    pushed_out = 2 * GRANTS_KEPT
    with store._env.begin() as txn:
        assert sum(1 for _ in txn.cursor(db=store._state_db)) == pushed_out  # records of their own
    store = await open_lmdb.reopen(store)
    assert await counts(store, "jobs") == (3 * GRANTS_KEPT, 0, 0, 3 * GRANTS_KEPT)
    again = await fetch(store, "jobs", max=GRANTS_KEPT)  # some with a record of their own, some not
    assert {d[ATTEMPTS] for d in again} == {2}
    await publish(store, "jobs", b"fresh")
    again += await fetch(store, "jobs")
    assert await ack(store, "jobs", again) == {}
    with store._env.begin() as txn:
        assert sum(1 for _ in txn.cursor(db=store._state_db)) == 0  # every record went with its message
    assert await counts(store, "jobs") == (0, 0, 0, 0)


async def test_reopen_dead_letters_a_requeued_message_at_max_attempts(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    await publish(store, "jobs", b"a")
    await fetch(store, "jobs")  # leased at close, its only allowed delivery used
    store = await open_store.reopen(store)
    assert await fetch(store, "jobs") == []
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[HEADERS] is not None and dead[HEADERS][DLQ_REASON] == "max_attempts"
    assert await counts(store, "jobs") == (0, 0, 0, 0)


async def test_reopen_after_purge_delete_and_dead_letter(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "purged", b"1", b"2")
    await publish(store, "deleted", b"1")
    await publish(store, "rejected", b"r")
    await one(store, Purge("purged"))
    await one(store, DeleteQueue("deleted"))
    await one(store, Reject("rejected", leases(await fetch(store, "rejected")), 1))
    store = await open_store.reopen(store)
    assert sorted(s.name for s in await one(store, Stats(None))) == ["purged", "rejected", "rejected.dlq"]
    assert await counts(store, "purged") == (0, 0, 0, 0)
    assert await publish(store, "purged", b"3") == [3]
    assert await counts(store, "rejected") == (0, 0, 0, 0)
    assert await publish(store, "rejected.dlq", b"x") == [2]
    [dead, extra] = await fetch(store, "rejected.dlq")
    assert dead[PAYLOAD] == b"r" and extra[PAYLOAD] == b"x"


# ---------------------------------------------------------------------------------------------------- store full
async def fill(store: Store, payload: bytes, per_batch: int = 1, limit: int = 10_000) -> list[int]:
    """Publish until the store refuses with STORE_FULL; the ids that were accepted."""
    ids: list[int] = []
    for _ in range(limit):
        [result] = await run(store, Publish("big", [payload] * per_batch))
        if isinstance(result, StoreError):
            assert result.code == ErrorCode.STORE_FULL, result
            return ids
        assert isinstance(result, Published)
        ids += range(result.first_id, result.first_id + result.count)
    raise AssertionError("the store never became full")


async def test_store_full_refuses_publishes_until_consumers_drain(open_store: Opener) -> None:
    store = await open_store(max_size=MIB)
    payload = b"p" * 60_000
    ids = await fill(store, payload)
    assert ids, "not even one message fitted"
    assert await counts(store, "big") == (len(ids), 0, 0, len(ids))
    await refused(store, Publish("big", [payload]), ErrorCode.STORE_FULL)
    ds = await fetch(store, "big", max=3)
    assert [d[ID] for d in ds] == ids[:3]
    assert await ack(store, "big", ds) == {}
    assert await counts(store, "big") == (len(ids) - 3, 0, 0, len(ids) - 3)
    # Three messages' worth of room was freed: one more fits.
    result = await one(store, Publish("big", [payload]))
    assert result.first_id > ids[-1]
    rest = await fetch(store, "big")
    assert all(d[PAYLOAD] == payload for d in rest)
    assert await ack(store, "big", rest) == {}


async def test_store_full_still_lets_consumers_fetch_a_batch(open_store: Opener) -> None:
    store = await open_store(max_size=MIB)
    payload = b"s" * 1000
    ids = await fill(store, payload)
    ds = await fetch(store, "big", max=200)
    assert [d[ID] for d in ds] == ids[:200]
    assert await ack(store, "big", ds) == {}
    assert await counts(store, "big") == (len(ids) - 200, 0, 0, len(ids) - 200)


@pytest.mark.parametrize(
    ("size", "per_fetch"),
    [pytest.param(60_000, 1, id="large-messages"), pytest.param(1000, 10, id="small-messages")],
)
async def test_store_full_acks_still_work_after_several_fetches(open_store: Opener, size: int, per_fetch: int) -> None:
    # Consumers fetch in several batches before they ack: every one of those commits needs pages of a full map.
    store = await open_store(max_size=MIB)
    ids = await fill(store, b"f" * size)
    held: list[Delivery] = []
    for _ in range(3):
        held += await fetch(store, "big", max=per_fetch)
    assert [d[ID] for d in held] == ids[: 3 * per_fetch]
    for d in held:
        assert await ack(store, "big", [d]) == {}
    assert await counts(store, "big") == (len(ids) - len(held), 0, 0, len(ids) - len(held))


async def test_store_full_is_not_permanent_after_a_reopen(open_store: Opener) -> None:
    store = await open_store(max_size=MIB)
    ids = await fill(store, b"q" * 60_000)
    store = await open_store.reopen(store, max_size=MIB)
    assert await counts(store, "big") == (len(ids), 0, 0, len(ids))
    ds = await fetch(store, "big")
    assert [d[ID] for d in ds] == ids
    assert await ack(store, "big", ds) == {}
    assert await counts(store, "big") == (0, 0, 0, 0)


async def test_after_a_reopen_an_ack_and_a_fetch_in_one_batch_never_redeliver_the_acked(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "q", b"1", b"2", b"3", b"4")
    delivered = await fetch(store, "q", max=3)
    await store.close()
    store = await open_store()
    first = delivered[0]
    acked, fetched = await both(store, Ack("q", [[first[0], first[1]]], 1), Fetch("q", 10, LONG, 2))
    assert acked == {}  # the pre-restart token of an undelivered-again message still acks
    ids = [d[0] for d in fetched]
    assert first[0] not in ids
    assert sorted(ids) == [2, 3, 4]
    assert await counts(store, "q") == (0, 3, 0, 3)


# -------------------------------------------------------------------------------------------- many ops of a kind
async def test_publishes_of_one_batch_get_consecutive_ids_in_op_order_and_each_its_own_refusal(
    open_store: Opener,
) -> None:
    # The requests of many producers in one loop turn: an engine may store them together, but each keeps its
    # own answer, and one that does not fit is refused alone.
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(max_length=4)))
    results = await run(
        store,
        Publish("jobs", [b"a", b"b"]),
        Publish("jobs", [b"c"], headers=[{"k": "v"}]),
        Publish("jobs", [b"d", b"e"]),  # would make 5
        Publish("jobs", [b"f"]),
        Publish("other", [b"x"]),
        Publish("jobs", [b"g"]),  # full again
    )
    assert results[:2] == [Published(1, 2), Published(3, 1)]
    assert isinstance(results[2], StoreError) and results[2].code == ErrorCode.QUEUE_FULL
    assert results[3:5] == [Published(4, 1), Published(1, 1)]
    assert isinstance(results[5], StoreError) and results[5].code == ErrorCode.QUEUE_FULL
    ds = await fetch(store, "jobs")
    assert [(d[ID], d[PAYLOAD], d[HEADERS]) for d in ds] == [
        (1, b"a", None),
        (2, b"b", None),
        (3, b"c", {"k": "v"}),
        (4, b"f", None),
    ]


async def test_acks_of_one_batch_each_get_their_own_refusals_in_op_order(store: Store) -> None:
    await publish(store, "jobs", b"a", b"b", b"c")
    first = await fetch(store, "jobs", max=1)
    await one(store, Nack("jobs", leases(first), 1))
    a, b, c = await fetch(store, "jobs", max=3)
    assert a[ID] == first[0][ID]
    results = await run(
        store,
        Ack("jobs", leases(first), 1),  # the earlier delivery's token
        Ack("jobs", leases([a, b]), 2),
        Ack("jobs", leases([b]), 3),  # acked just before, in this batch
        Ack("jobs", [(c[ID], c[TOKEN] + 1000)], 4),  # never issued
        Ack("missing", leases([c]), 5),
    )
    assert results[0] == {a[ID]: StaleReason.REDELIVERED}
    assert results[1] == {}
    assert results[2] == {b[ID]: StaleReason.GONE}
    assert results[3] == {c[ID]: StaleReason.UNKNOWN}
    assert isinstance(results[4], StoreError) and results[4].code == ErrorCode.NOT_FOUND
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [c]) == {}


async def test_fetches_and_acks_of_one_batch_give_what_they_give_one_after_the_other(store: Store) -> None:
    await publish(store, "jobs", *[b"%d" % i for i in range(8)])
    held = await fetch(store, "jobs", max=2, owner=7)
    results = await run(
        store,
        Fetch("jobs", 2, LONG, 1),
        Ack("jobs", leases(held[:1]), 7),
        Fetch("jobs", 3, LONG, 2),
        Ack("jobs", leases(held), 7),  # the first was acked just before
        Fetch("jobs", 5, LONG, 3),
    )
    first, acked, second, again, third = results
    assert [d[ID] for d in cast(list[Delivery], first)] == [3, 4]
    assert acked == {}
    assert [d[ID] for d in cast(list[Delivery], second)] == [5, 6, 7]
    assert again == {held[0][ID]: StaleReason.GONE}
    assert [d[ID] for d in cast(list[Delivery], third)] == [8]
    assert await counts(store, "jobs") == (0, 6, 0, 6)
    await run(store, Release(1), Release(2), Release(3))
    assert await counts(store, "jobs") == (6, 0, 0, 6)


async def test_a_late_ack_and_a_fetch_of_one_batch_keep_their_order(store: Store) -> None:
    # The lease ended, so the message is ready again with its token still current: a fetch before the ack takes
    # it (and the ack is refused), an ack before the fetch deletes it.
    await publish(store, "jobs", b"a", b"b")
    [a] = await fetch(store, "jobs", max=1, lease=SHORT)
    let_timer_pass(store)
    await run(store, Expire())
    fetched, refused = await run(store, Fetch("jobs", 1, LONG, 1), Ack("jobs", leases([a]), 2))
    assert [d[ID] for d in cast(list[Delivery], fetched)] == [a[ID]] and refused == {a[ID]: StaleReason.REDELIVERED}
    [b] = await fetch(store, "jobs", max=1, lease=SHORT)
    let_timer_pass(store)
    await run(store, Expire())
    acked, fetched = await run(store, Ack("jobs", leases([b]), 2), Fetch("jobs", 1, LONG, 1))
    assert acked == {} and fetched == []


async def test_fetches_of_one_batch_move_out_what_they_meet_as_one_fetch_would(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=1)))
    await publish(store, "jobs", b"a", b"b", b"c")
    [a] = await fetch(store, "jobs", max=1)
    await one(store, Nack("jobs", leases([a]), 1))  # its one attempt used: the next fetch dead-letters it
    first, second = await run(store, Fetch("jobs", 1, LONG, 1), Fetch("jobs", 5, LONG, 2))
    assert [d[PAYLOAD] for d in cast(list[Delivery], first)] == [b"b"]
    assert [d[PAYLOAD] for d in cast(list[Delivery], second)] == [b"c"]
    assert [d[PAYLOAD] for d in await fetch(store, "jobs.dlq")] == [b"a"]


async def test_settle_ops_take_their_leases_as_an_iterator(store: Store) -> None:
    # What the request parser hands over (a zip of the ids and tokens arrays): iterated once by the store.
    await publish(store, "jobs", b"a", b"b", b"c")
    a, b, c = await fetch(store, "jobs", max=3)
    assert await one(store, Touch("jobs", iter(leases([a])), 1, lease=LONG)) == {}
    assert await one(store, Nack("jobs", iter(leases([b])), 1)) == {}
    results = await run(store, Ack("jobs", iter(leases([a])), 1), Ack("jobs", iter(leases([c, b])), 1))
    assert results == [{}, {b[ID]: StaleReason.SETTLED}]
    assert await counts(store, "jobs") == (1, 0, 0, 1)
