"""The store's messaging features on their own, no sockets: peek, redrive, delays, retries with backoff, TTL,
priorities, overflow, deduplication and topics, and what of each survives a reopen."""

from __future__ import annotations

from typing import Any

import pytest

from replika_protocol import ErrorCode
from replika_server.store import (
    Bind,
    Declare,
    DeleteQueue,
    Expire,
    Fetch,
    Nack,
    Peek,
    Publish,
    Published,
    PublishTopic,
    Purge,
    QueueOptions,
    Redrive,
    Reject,
    Release,
    StaleReason,
    Stats,
    Store,
    Touch,
    Unbind,
    is_valid_pattern,
)
from replika_server.store.base import MAX_RETRY_DELAY
from tests.engines import Opener, StoreSpace
from tests.test_store import (
    ATTEMPTS,
    DLQ_ATTEMPTS,
    DLQ_ID,
    DLQ_QUEUE,
    DLQ_REASON,
    HEADERS,
    ID,
    LONG,
    PAYLOAD,
    SHORT,
    ack,
    both,
    clock_of,
    counts,
    execute,
    fetch,
    leases,
    let_time_pass,
    let_timer_pass,
    one,
    publish,
    refused,
    run,
    stats,
)

#: Bindings a queue may hold (SPEC.md, limits: "bindings per queue").
MAX_BINDINGS = 1000
#: Seconds before a due time at which a test checks that it has not come yet.
EARLY = 0.01


async def ids_of(store: Store, op: Publish) -> list[int]:
    result = await one(store, op)
    return list(range(result.first_id, result.first_id + result.count))


async def dead_letter(
    store: Store, queue: str, *payloads: bytes, headers: list[dict[str, str] | None] | None = None
) -> None:
    """Publish ``payloads`` to ``queue`` and reject them all into its dead-letter queue."""
    await publish(store, queue, *payloads, headers=headers)
    ds = await fetch(store, queue, max=len(payloads))
    assert await one(store, Reject(queue, leases(ds), 1)) == {}


# ---------------------------------------------------------------------------------------------------- peek
async def test_peek_reads_ready_messages_in_order_without_leasing(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2", b"3", headers=[{"k": "v"}, None, None])
    [first] = await fetch(store, "jobs", max=1)
    await one(store, Nack("jobs", leases([first]), 1))  # ready again, delivered once
    peeked = await one(store, Peek("jobs", 10))
    assert [(p[0], p[1], p[3], p[4]) for p in peeked] == [
        (1, 1, b"1", {"k": "v"}),
        (2, 0, b"2", None),
        (3, 0, b"3", None),
    ]
    assert peeked[0][2] == first[3]  # published_at
    assert await counts(store, "jobs") == (3, 0, 0, 3)  # nothing changed
    assert [p[0] for p in await one(store, Peek("jobs", 2))] == [1, 2]
    ds = await fetch(store, "jobs", max=10)
    assert [(d[ID], d[ATTEMPTS]) for d in ds] == [(1, 2), (2, 1), (3, 1)]  # peeking counted no attempt


async def test_peek_skips_leased_and_delayed_messages(store: Store) -> None:
    await publish(store, "jobs", b"1", b"2", b"3", b"4")
    leased, delayed = await fetch(store, "jobs", max=2)
    await one(store, Nack("jobs", leases([delayed]), 1, delay=LONG))
    assert [p[0] for p in await one(store, Peek("jobs", 10))] == [3, 4]
    assert await ack(store, "jobs", [leased]) == {}


async def test_peek_stops_at_the_byte_budget_but_returns_one(store: Store) -> None:
    await publish(store, "jobs", b"x" * 1000, b"y" * 1000)
    assert len(await one(store, Peek("jobs", 10, max_bytes=1500))) == 1
    assert len(await one(store, Peek("jobs", 10, max_bytes=10))) == 1
    assert len(await one(store, Peek("jobs", 10, max_bytes=5000))) == 2


async def test_peek_of_a_missing_queue_is_not_found_and_creates_nothing(store: Store) -> None:
    await refused(store, Peek("nope", 1), ErrorCode.NOT_FOUND)
    await refused(store, Peek("nope", 1), ErrorCode.NOT_FOUND)


async def test_peek_sees_what_a_batch_before_committed_only(store: Store) -> None:
    await publish(store, "jobs", b"old")
    _, peeked = await both(store, Publish("jobs", [b"new"]), Peek("jobs", 10))
    assert [p[3] for p in peeked] == [b"old"]


# ---------------------------------------------------------------------------------------------------- redrive
async def test_redrive_moves_dead_letters_back_to_where_they_came_from(store: Store) -> None:
    await dead_letter(store, "a", b"a1", b"a2", headers=[{"keep": "me"}, None])
    await dead_letter(store, "b", b"b1")
    await one(store, Reject("a.dlq", leases(await fetch(store, "a.dlq", max=1)), 1))  # a.dlq.dlq: from a.dlq
    assert await counts(store, "a.dlq") == (1, 0, 0, 1)
    await publish(store, "a.dlq", b"plain")  # no dead-letter header: it stays
    batch = await store.execute([Redrive("a.dlq", None, 100)])
    assert batch.results == [1]
    assert "a" in batch.readied
    assert await counts(store, "a.dlq") == (1, 0, 0, 1)
    [again] = await fetch(store, "a")
    assert (again[PAYLOAD], again[HEADERS], again[ATTEMPTS]) == (b"a2", None, 1)
    assert await one(store, Redrive("a.dlq.dlq", None, 100)) == 1
    plain, back = await fetch(store, "a.dlq")
    assert (plain[PAYLOAD], back[PAYLOAD]) == (b"plain", b"a1")
    assert back[HEADERS] == {"keep": "me"}  # the old dead-letter headers are gone, the others stay
    assert await one(store, Redrive("b.dlq", None, 100)) == 1
    assert [d[PAYLOAD] for d in await fetch(store, "b")] == [b"b1"]


async def test_redrive_to_a_named_queue_and_at_most_max(store: Store) -> None:
    await dead_letter(store, "jobs", b"1", b"2", b"3")
    await publish(store, "jobs.dlq", b"no header")
    assert await one(store, Redrive("jobs.dlq", "retry", 2)) == 2
    assert await one(store, Redrive("jobs.dlq", "retry", 10)) == 2  # `to` needs no header
    assert [d[PAYLOAD] for d in await fetch(store, "retry")] == [b"1", b"2", b"3", b"no header"]
    assert await counts(store, "jobs.dlq") == (0, 0, 0, 0)
    assert await counts(store, "jobs") == (0, 0, 0, 0)


async def test_redrive_leaves_leased_and_unroutable_messages_and_keeps_their_order(store: Store) -> None:
    await publish(store, "jobs.dlq", b"stays-1")
    await dead_letter(store, "jobs", b"moves-1")
    await publish(store, "jobs.dlq", b"stays-2", headers=[{DLQ_QUEUE: "not a queue name"}])
    await dead_letter(store, "jobs", b"moves-2", b"leased")
    ds = await fetch(store, "jobs.dlq", max=5)
    assert [d[PAYLOAD] for d in ds] == [b"stays-1", b"moves-1", b"stays-2", b"moves-2", b"leased"]
    await one(store, Nack("jobs.dlq", leases(ds[:4]), 1))
    assert await one(store, Redrive("jobs.dlq", None, 100)) == 2
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"moves-1", b"moves-2"]
    assert await one(store, Peek("jobs.dlq", 10)) != []
    assert [p[3] for p in await one(store, Peek("jobs.dlq", 10))] == [b"stays-1", b"stays-2"]
    assert await ack(store, "jobs.dlq", ds[4:]) == {}


async def test_redrive_keeps_never_delivered_unroutable_messages_in_place_across_a_reopen(
    open_store: Opener,
) -> None:
    store = await open_store()
    await publish(store, "jobs.dlq", b"stays-1")
    await dead_letter(store, "jobs", b"moves")
    await publish(store, "jobs.dlq", b"stays-2", b"stays-3")
    # Never delivered: they are skipped in place, and a fetch in the same batch still sees them once.
    moved, fetched = await both(store, Redrive("jobs.dlq", None, 100), Fetch("jobs.dlq", 1, LONG, 1))
    assert moved == 1
    assert [d[PAYLOAD] for d in fetched] == [b"stays-1"]
    store = await open_store.reopen(store)
    ds = await fetch(store, "jobs.dlq", max=10)
    assert [(d[PAYLOAD], d[ATTEMPTS]) for d in ds] == [(b"stays-1", 2), (b"stays-2", 1), (b"stays-3", 1)]
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"moves"]


async def test_a_redrive_and_a_fetch_in_one_batch_never_deliver_a_moved_message(store: Store) -> None:
    await dead_letter(store, "jobs", b"1", b"2")
    moved, fetched = await both(store, Redrive("jobs.dlq", None, 1), Fetch("jobs.dlq", 10, LONG, 1))
    assert moved == 1
    assert [d[PAYLOAD] for d in fetched] == [b"2"]


async def test_redrive_of_a_missing_queue_is_not_found(store: Store) -> None:
    await refused(store, Redrive("nope", None, 10), ErrorCode.NOT_FOUND)


async def test_redriven_messages_are_new_and_reasons_start_over(store: Store) -> None:
    await dead_letter(store, "jobs", b"x")
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[HEADERS] is not None and dead[HEADERS][DLQ_REASON] == "rejected"
    await one(store, Nack("jobs.dlq", leases([dead]), 1))
    assert await one(store, Redrive("jobs.dlq", None, 10)) == 1
    assert await ack(store, "jobs.dlq", [dead]) == {dead[ID]: StaleReason.GONE}
    [again] = await fetch(store, "jobs")
    assert again[ID] == 2 and again[ATTEMPTS] == 1


# ---------------------------------------------------------------------------------------------------- delays
async def test_a_delayed_publish_is_delayed_then_ready_in_id_order(store: Store) -> None:
    await publish(store, "jobs", b"first")
    later = await ids_of(store, Publish("jobs", [b"later"], delay=SHORT))
    await publish(store, "jobs", b"third")
    assert await counts(store, "jobs") == (2, 0, 1, 3)
    assert [d[PAYLOAD] for d in await fetch(store, "jobs", max=1)] == [b"first"]
    let_timer_pass(store)
    batch = await execute(store, Expire())
    assert "jobs" in batch.readied
    ds = await fetch(store, "jobs")
    assert [(d[ID], d[PAYLOAD], d[ATTEMPTS]) for d in ds] == [(later[0], b"later", 1), (3, b"third", 1)]


async def test_a_delayed_publish_is_not_ready_before_its_due_time(store: Store) -> None:
    batch = await execute(store, Publish("jobs", [b"a", b"b"], delay=LONG))
    assert "jobs" not in batch.readied  # nothing for a long poll to wake up for
    await run(store, Expire())
    assert await fetch(store, "jobs") == []
    assert await one(store, Peek("jobs", 10)) == []
    assert await counts(store, "jobs") == (0, 0, 2, 2)
    timer = store.next_timer()
    assert timer is not None and timer > clock_of(store).monotonic() + LONG / 2


async def test_delayed_publishes_keep_their_due_time_across_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Publish("jobs", [b"long"], delay=LONG))
    await one(store, Publish("jobs", [b"short"], headers=[{"k": "v"}], delay=SHORT))
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (0, 0, 2, 2)
    let_time_pass(store, SHORT)
    await run(store, Expire())
    assert await counts(store, "jobs") == (1, 0, 1, 2)
    [d] = await fetch(store, "jobs")
    assert (d[PAYLOAD], d[HEADERS], d[ATTEMPTS]) == (b"short", {"k": "v"}, 1)
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (1, 0, 1, 2)  # the lease ended with the store; the delay did not
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[ATTEMPTS]) == (d[ID], 2)
    assert await ack(store, "jobs", [again]) == {}


async def test_a_delayed_publish_and_a_fetch_in_one_batch(store: Store) -> None:
    # Ready at once (delay 0 goes the plain way) or delayed: nothing published in a batch is fetched in it.
    results = await run(
        store, Publish("jobs", [b"a"], delay=0.0), Publish("jobs", [b"b"], ttl=LONG), Fetch("jobs", 9, LONG, 1)
    )
    assert results[2] == []
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"a", b"b"]


# ---------------------------------------------------------------------------------------------------- retries
async def ready_after(store: Store, queue: str, seconds: float) -> None:
    """The queue's one message, delayed now, becomes ready ``seconds`` from now and not before."""
    let_time_pass(store, seconds - EARLY)
    await run(store, Expire())
    assert await counts(store, queue) == (0, 0, 1, 1), f"ready before {seconds} s"
    let_time_pass(store, EARLY)
    await run(store, Expire())
    assert await counts(store, queue) == (1, 0, 0, 1), f"not ready after {seconds} s"


async def test_retry_delay_grows_with_backoff_up_to_the_cap(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(retry_delay=10.0, retry_backoff=3.0, retry_max_delay=50.0)))
    await publish(store, "jobs", b"a")
    for delay in (10.0, 30.0, 50.0, 50.0):  # after attempts 1, 2, 3, 4
        [d] = await fetch(store, "jobs")
        assert await one(store, Nack("jobs", leases([d]), 1)) == {}
        await ready_after(store, "jobs", delay)
    # Options are replaced whole: no cap given is MAX_RETRY_DELAY (30 days), and 100 ** 4 s is past it.
    await one(store, Declare("jobs", QueueOptions(retry_delay=1.0, retry_backoff=100.0)))
    [d] = await fetch(store, "jobs")
    assert d[ATTEMPTS] == 5
    assert await one(store, Nack("jobs", leases([d]), 1)) == {}
    await ready_after(store, "jobs", MAX_RETRY_DELAY)


async def test_a_nack_without_delay_waits_the_retry_delay(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(retry_delay=SHORT, retry_backoff=1.0)))
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    assert await one(store, Nack("jobs", leases([d]), 1)) == {}
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    let_time_pass(store, SHORT - EARLY)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 1, 1)  # not before its retry delay
    let_timer_pass(store)
    await run(store, Expire())
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[ATTEMPTS]) == (d[ID], 2)
    assert await one(store, Nack("jobs", leases([again]), 1, delay=0.0)) == {}  # an explicit delay wins
    assert await counts(store, "jobs") == (1, 0, 0, 1)


async def test_an_unseen_nack_is_not_backed_off(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(retry_delay=LONG)))
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs")
    await one(store, Nack("jobs", leases([d]), 1, unseen=True))
    assert await counts(store, "jobs") == (1, 0, 0, 1)


@pytest.mark.parametrize("how", ["expire", "release"])
async def test_an_ended_lease_waits_the_retry_delay_and_its_token_stays_current(store: Store, how: str) -> None:
    await one(store, Declare("jobs", QueueOptions(retry_delay=LONG)))
    await publish(store, "jobs", b"a", b"b")
    first, second = await fetch(store, "jobs", lease=SHORT if how == "expire" else LONG, owner=3)
    if how == "expire":
        let_timer_pass(store)
        await run(store, Expire())
    else:
        await run(store, Release(3))
    assert await counts(store, "jobs") == (0, 0, 2, 2)
    assert await fetch(store, "jobs") == []
    assert await ack(store, "jobs", [first]) == {}  # the work was done: the ack counts
    assert await one(store, Touch("jobs", leases([second]), 1, lease=LONG)) == {}  # taken back from its delay
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    assert await ack(store, "jobs", [second]) == {}


async def test_a_message_touched_out_of_its_retry_delay_is_ready_after_a_reopen(open_store: Opener) -> None:
    # Found by the state machine: the touch took it back in memory while its record kept the old due time.
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(retry_delay=LONG)))
    await publish(store, "jobs", b"a")
    [d] = await fetch(store, "jobs", lease=SHORT)
    let_timer_pass(store)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    assert await one(store, Touch("jobs", leases([d]), 1, lease=LONG)) == {}
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    [again] = await fetch(store, "jobs")
    assert (again[ID], again[ATTEMPTS]) == (d[ID], 2)


async def test_a_retry_delay_survives_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(retry_delay=LONG, retry_backoff=1.5, retry_max_delay=2 * LONG)))
    await publish(store, "jobs", b"a")
    await one(store, Nack("jobs", leases(await fetch(store, "jobs")), 1))
    store = await open_store.reopen(store)
    assert await counts(store, "jobs") == (0, 0, 1, 1)
    s = await stats(store, "jobs")
    assert (s.options.retry_delay, s.options.retry_backoff, s.options.retry_max_delay) == (LONG, 1.5, 2 * LONG)


async def test_max_attempts_still_dead_letters_before_any_retry_delay(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_attempts=1, retry_delay=LONG)))
    await publish(store, "jobs", b"a")
    await one(store, Nack("jobs", leases(await fetch(store, "jobs")), 1))
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await counts(store, "jobs.dlq") == (1, 0, 0, 1)


# ---------------------------------------------------------------------------------------------------- TTL
async def test_an_expired_message_is_never_delivered_and_goes_to_the_dlq(store: Store) -> None:
    await one(store, Publish("jobs", [b"short"], headers=[{"k": "v"}], ttl=SHORT))
    await publish(store, "jobs", b"plain")
    await one(store, Publish("jobs", [b"long"], ttl=LONG))
    let_time_pass(store, SHORT)
    ds = await fetch(store, "jobs")  # before any timer ran: the fetch itself must not hand it out
    assert [d[PAYLOAD] for d in ds] == [b"plain", b"long"]
    [dead] = await fetch(store, "jobs.dlq")
    assert dead[PAYLOAD] == b"short"
    assert dead[HEADERS] == {"k": "v", DLQ_QUEUE: "jobs", DLQ_REASON: "expired", DLQ_ID: "1", DLQ_ATTEMPTS: "0"}


async def test_expiry_happens_without_a_fetch(store: Store) -> None:
    await one(store, Publish("jobs", [b"a", b"b"], ttl=SHORT))
    let_timer_pass(store)
    batch = await execute(store, Expire())
    assert "jobs.dlq" in batch.readied
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await counts(store, "jobs.dlq") == (2, 0, 0, 2)
    assert (await stats(store, "jobs")).counters["dead_lettered"] == 2


async def test_expired_drop_deletes_instead(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(expired="drop")))
    await one(store, Publish("jobs", [b"a"], ttl=SHORT))
    let_timer_pass(store)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert (await stats(store, "jobs")).counters["dropped"] == 1
    await refused(store, Stats("jobs.dlq"), ErrorCode.NOT_FOUND)


async def test_message_ttl_expires_a_backlog_from_its_front(store: Store) -> None:
    await publish(store, "jobs", b"old-1", b"old-2")
    await one(store, Declare("jobs", QueueOptions(message_ttl=SHORT)))  # applies to messages already there
    let_time_pass(store, SHORT)
    await publish(store, "jobs", b"new")  # fresh: its TTL counts from now
    await run(store, Expire())
    assert await counts(store, "jobs") == (1, 0, 0, 1)
    assert [d[PAYLOAD] for d in await fetch(store, "jobs.dlq")] == [b"old-1", b"old-2"]


async def test_message_ttl_catches_nacked_and_delayed_messages_and_the_leased_at_lease_end(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(message_ttl=0.3)))
    await publish(store, "jobs", b"nacked", b"delayed", b"leased")
    nacked, delayed, leased = await fetch(store, "jobs", max=3)
    await one(store, Nack("jobs", leases([nacked]), 1))
    await one(store, Nack("jobs", leases([delayed]), 1, delay=LONG))
    let_time_pass(store, 0.3)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 1, 0, 1)  # a leased message is not taken from its consumer
    assert await one(store, Nack("jobs", leases([leased]), 1)) == {}
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    dead = await fetch(store, "jobs.dlq")
    assert sorted(bytes(d[PAYLOAD]) for d in dead) == [b"delayed", b"leased", b"nacked"]
    assert all(d[HEADERS] is not None and d[HEADERS][DLQ_REASON] == "expired" for d in dead)


async def test_an_acked_message_does_not_expire(store: Store) -> None:
    await one(store, Publish("jobs", [b"a"], ttl=SHORT))
    [d] = await fetch(store, "jobs")
    assert await ack(store, "jobs", [d]) == {}
    let_time_pass(store, SHORT)
    await run(store, Expire())
    await refused(store, Stats("jobs.dlq"), ErrorCode.NOT_FOUND)


async def test_ttls_survive_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("q", QueueOptions(message_ttl=LONG, expired="drop")))
    await one(store, Publish("jobs", [b"own"], ttl=SHORT))
    await publish(store, "q", b"kept")
    store = await open_store.reopen(store)
    s = await stats(store, "q")
    assert (s.options.message_ttl, s.options.expired) == (LONG, "drop")
    let_time_pass(store, SHORT)
    await run(store, Expire())
    assert await counts(store, "jobs") == (0, 0, 0, 0)
    assert await counts(store, "jobs.dlq") == (1, 0, 0, 1)
    assert await counts(store, "q") == (1, 0, 0, 1)


async def test_the_dead_letter_copy_drops_the_messages_own_ttl(store: Store) -> None:
    await one(store, Publish("jobs", [b"a"], ttl=SHORT))
    await one(store, Reject("jobs", leases(await fetch(store, "jobs")), 1))
    let_time_pass(store, SHORT)
    await run(store, Expire())
    assert await counts(store, "jobs.dlq") == (1, 0, 0, 1)


# ---------------------------------------------------------------------------------------------------- priorities
async def test_higher_priorities_first_fifo_within_one(store: Store) -> None:
    await one(store, Publish("jobs", [b"p0-a"]))
    await one(store, Publish("jobs", [b"p5-a", b"p5-b"], priority=5))
    await one(store, Publish("jobs", [b"p9-a"], priority=9))
    await one(store, Publish("jobs", [b"p0-b"]))
    await one(store, Publish("jobs", [b"p5-c"], priority=5))
    ds = await fetch(store, "jobs", max=2)
    assert [d[PAYLOAD] for d in ds] == [b"p9-a", b"p5-a"]
    await one(store, Nack("jobs", leases(ds), 1))  # back in their priorities, ahead of later ids
    assert [p[3] for p in await one(store, Peek("jobs", 10))] == [b"p9-a", b"p5-a", b"p5-b", b"p5-c", b"p0-a", b"p0-b"]
    ds = await fetch(store, "jobs", max=10)
    assert [(d[PAYLOAD], d[ATTEMPTS]) for d in ds] == [
        (b"p9-a", 2),
        (b"p5-a", 2),
        (b"p5-b", 1),
        (b"p5-c", 1),
        (b"p0-a", 1),
        (b"p0-b", 1),
    ]
    assert [d[ID] for d in ds] == [4, 2, 3, 6, 1, 5]  # ids stay per queue, in publish order


async def test_priorities_survive_a_reopen_and_apply_to_delayed_messages(open_store: Opener) -> None:
    store = await open_store()
    await publish(store, "jobs", b"low")
    await one(store, Publish("jobs", [b"high-delayed"], priority=7, delay=SHORT))
    await one(store, Publish("jobs", [b"mid"], priority=3))
    [low] = await fetch(store, "jobs", max=1)
    assert low[PAYLOAD] == b"mid"
    store = await open_store.reopen(store)
    let_timer_pass(store)
    await run(store, Expire())
    ds = await fetch(store, "jobs", max=10)
    assert [(d[PAYLOAD], d[ATTEMPTS]) for d in ds] == [(b"high-delayed", 1), (b"mid", 2), (b"low", 1)]


async def test_a_dead_lettered_message_keeps_its_priority(store: Store) -> None:
    await publish(store, "jobs.dlq", b"low")
    await one(store, Publish("jobs", [b"high"], priority=8))
    await one(store, Reject("jobs", leases(await fetch(store, "jobs")), 1))
    assert [d[PAYLOAD] for d in await fetch(store, "jobs.dlq")] == [b"high", b"low"]


async def test_purge_and_delete_reach_every_lane(open_store: Opener, store_space: StoreSpace) -> None:
    store = await open_store()
    await one(store, Publish("jobs", [b"a"], priority=1))
    await one(store, Publish("jobs", [b"b"], priority=2, delay=LONG))
    await one(store, Publish("jobs", [b"c"]))
    await one(store, Publish("jobs", [b"leased"], priority=9))
    [leased] = await fetch(store, "jobs", max=1)
    assert await one(store, Purge("jobs")) == 3
    assert await counts(store, "jobs") == (0, 1, 0, 1)
    await one(store, Publish("jobs", [b"d"], priority=1))
    store = await open_store.reopen(store)
    assert [d[PAYLOAD] for d in await fetch(store, "jobs")] == [b"leased", b"d"]
    assert await run(store, DeleteQueue("jobs")) == [None]
    store = await open_store.reopen(store)
    await refused(store, Stats("jobs"), ErrorCode.NOT_FOUND)
    assert store_space.holdings(store) == {}  # not a message left behind in any lane
    assert leased[PAYLOAD] == b"leased"


# ---------------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("overflow", ["drop_oldest", "dead_letter"])
async def test_overflow_makes_room_from_the_oldest_ready_messages(store: Store, overflow: Any) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=3, overflow=overflow)))
    await publish(store, "jobs", b"1", b"2", b"3")
    [leased] = await fetch(store, "jobs", max=1)  # in flight: never pushed out
    assert await publish(store, "jobs", b"4", b"5") == [4, 5]
    assert await counts(store, "jobs") == (2, 1, 0, 3)
    assert [p[3] for p in await one(store, Peek("jobs", 10))] == [b"4", b"5"]
    if overflow == "dead_letter":
        dead = await fetch(store, "jobs.dlq")
        assert [(d[PAYLOAD], d[HEADERS][DLQ_REASON]) for d in dead] == [(b"2", "overflow"), (b"3", "overflow")]  # type: ignore[index]
    else:
        assert (await stats(store, "jobs")).counters["dropped"] == 2
    await refused(store, Publish("jobs", [b"6", b"7", b"8"]), ErrorCode.QUEUE_FULL)  # the leased one is in the way
    assert await ack(store, "jobs", [leased]) == {}


async def test_overflow_by_bytes_and_across_priorities(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_bytes=10, overflow="drop_oldest")))
    await publish(store, "jobs", b"aaaa")
    await one(store, Publish("jobs", [b"bbbb"], priority=5))
    await one(store, Publish("jobs", [b"cc"], priority=9))
    assert await publish(store, "jobs", b"dddddd") == [4]  # needs 6 bytes: a (1) and b (2) go, oldest ids first
    assert [p[3] for p in await one(store, Peek("jobs", 10))] == [b"cc", b"dddddd"]
    await refused(store, Publish("jobs", [b"x" * 11]), ErrorCode.QUEUE_FULL)


async def test_a_publish_within_limits_never_drops(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=5, overflow="drop_oldest")))
    await publish(store, "jobs", b"1", b"2")
    await publish(store, "jobs", b"3", b"4", b"5")
    assert await counts(store, "jobs") == (5, 0, 0, 5)


# ---------------------------------------------------------------------------------------------------- dedup
async def test_a_repeated_dedup_id_stores_nothing_and_returns_the_first_id(store: Store) -> None:
    first = await one(store, Publish("jobs", [b"a", b"b"], dedup_ids=["x", None]))
    assert first == Published(1, 2, [1, 2])
    again = await one(store, Publish("jobs", [b"a2", b"c", b"c2"], dedup_ids=["x", "y", "y"]))
    assert again == Published(3, 1, [1, 3, 3])
    assert await counts(store, "jobs") == (3, 0, 0, 3)
    await ack(store, "jobs", await fetch(store, "jobs"))
    # acked: still a repeat
    assert await one(store, Publish("jobs", [b"late"], dedup_ids=["x"])) == Published(
        4, 0, [1]
    )  # acked: still a repeat
    s = await stats(store, "jobs")
    assert (s.total, s.counters["published"], s.counters["deduplicated"]) == (0, 3, 3)


async def test_dedup_survives_a_reopen_and_ends_with_its_window(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Declare("jobs", QueueOptions(dedup_window=0.3)))
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))
    store = await open_store.reopen(store)
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(2, 0, [1])
    let_time_pass(store, 0.2)
    await one(store, Publish("jobs", [b"b"], dedup_ids=["y"]))
    let_time_pass(store, 0.1)  # 0.3 s since "x" was first seen, 0.1 s since "y" was
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(3, 1, [3])  # "x" is new again
    store = await open_store.reopen(store)
    assert await one(store, Publish("jobs", [b"b"], dedup_ids=["y"])) == Published(4, 0, [2])  # "y" is not
    let_time_pass(store, 60.0)  # past every window: whatever the engine keeps for pruning is due
    await run(store, Expire())
    store = await open_store.reopen(store)
    assert await one(store, Publish("jobs", [b"b"], dedup_ids=["y"])) == Published(4, 1, [4])


async def test_a_zero_window_turns_dedup_off(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(dedup_window=0)))
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(2, 1, [2])


async def test_deleting_a_queue_forgets_its_dedup_ids(open_store: Opener) -> None:
    store = await open_store()
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))
    await one(store, DeleteQueue("jobs"))
    store = await open_store.reopen(store)
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(1, 1, [1])


async def test_a_refused_publish_records_no_dedup_id(store: Store) -> None:
    await one(store, Declare("jobs", QueueOptions(max_length=1)))
    await publish(store, "jobs", b"full")
    await refused(store, Publish("jobs", [b"a"], dedup_ids=["x"]), ErrorCode.QUEUE_FULL)
    await ack(store, "jobs", await fetch(store, "jobs"))
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(2, 1, [2])


# ---------------------------------------------------------------------------------------------------- topics
async def test_publish_topic_stores_one_copy_per_bound_queue(store: Store) -> None:
    await run(
        store,
        Bind("all", "#"),
        Bind("eu", "orders.eu.*"),
        Bind("created", "*.*.created"),
        Bind("created", "orders.#"),  # two patterns of one queue: still one copy
        Bind("other", "billing.#"),
    )
    await publish(store, "eu", b"earlier")
    result = await one(store, PublishTopic("orders.eu.created", [b"x", b"y"], [{"k": "v"}, None]))
    assert result == {"all": [1, 2], "created": [1, 2], "eu": [2, 3]}
    assert [(d[PAYLOAD], d[HEADERS]) for d in await fetch(store, "created")] == [(b"x", {"k": "v"}), (b"y", None)]
    assert await counts(store, "other") == (0, 0, 0, 0)
    await one(store, Unbind("all", "#"))
    assert await one(store, PublishTopic("nobody.listens", [b"z"])) == {}


async def test_bindings_are_durable_listed_and_removed(open_store: Opener) -> None:
    store = await open_store()
    await run(store, Bind("q", "a.*"), Bind("q", "b.#"), Bind("q", "a.*"), Bind("r", "a.*"))
    store = await open_store.reopen(store)
    assert (await stats(store, "q")).bindings == ["a.*", "b.#"]
    assert (await stats(store, "q")).as_dict()["bindings"] == ["a.*", "b.#"]
    assert await one(store, PublishTopic("a.x", [b"1"])) == {"q": [1], "r": [1]}
    await run(store, Unbind("q", "a.*"), Unbind("q", "never.bound"))
    await one(store, DeleteQueue("r"))
    store = await open_store.reopen(store)
    assert (await stats(store, "q")).bindings == ["b.#"]
    assert await one(store, PublishTopic("a.x", [b"2"])) == {}
    assert await one(store, PublishTopic("b", [b"3"])) == {"q": [2]}
    await refused(store, Unbind("missing", "a"), ErrorCode.NOT_FOUND)


async def test_publish_topic_is_all_or_nothing(store: Store) -> None:
    await one(store, Declare("small", QueueOptions(max_length=1)))
    await run(store, Bind("small", "t"), Bind("big", "t"))
    assert await one(store, PublishTopic("t", [b"1"])) == {"big": [1], "small": [1]}
    await refused(store, PublishTopic("t", [b"2"]), ErrorCode.QUEUE_FULL)
    assert await counts(store, "big") == (1, 0, 0, 1)
    op = PublishTopic("t", [b"3"], may_publish=lambda name: name != "small")
    await refused(store, op, ErrorCode.FORBIDDEN)
    assert await counts(store, "big") == (1, 0, 0, 1)


async def test_publish_topic_with_options(store: Store) -> None:
    await run(store, Bind("a", "t.#"), Bind("b", "t.#"))
    await one(store, Publish("a", [b"low"]))
    r1 = await one(store, PublishTopic("t.x", [b"hi"], priority=5, dedup_ids=["d"]))
    r2 = await one(store, PublishTopic("t.y", [b"hi-again"], priority=5, dedup_ids=["d"]))
    assert r1 == r2 == {"a": [2], "b": [1]}
    await one(store, PublishTopic("t.z", [b"later"], delay=LONG, ttl=2 * LONG))
    assert [d[PAYLOAD] for d in await fetch(store, "a")] == [b"hi", b"low"]
    assert await counts(store, "b") == (1, 0, 1, 2)


#: (binding pattern, topic, whether the pattern matches the topic): AMQP's topic exchange semantics.
TOPIC_CASES = [
    ("a.b.c", "a.b.c", True),
    ("a.*.c", "a.b.c", True),
    ("a.*", "a.b.c", False),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("#", "anything.at.all", True),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.b.c.d", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.y.c", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a..b", "a..b", True),
    ("a.*.b", "a..b", True),
]


async def test_topic_patterns(store: Store) -> None:
    for i, (pattern, topic, expected) in enumerate(TOPIC_CASES):
        queue = f"case-{i}"
        await one(store, Bind(queue, pattern))
        reached = await one(store, PublishTopic(topic, [b"m"]))
        assert (queue in reached) is expected, (pattern, topic, reached)
        await one(store, Unbind(queue, pattern))


def test_binding_patterns_are_validated() -> None:
    for good in ["a", "a.*", "#", "*.b.#", "x:y-z_1.#"]:
        assert is_valid_pattern(good), good
    for bad in ["", "a*", "a.b#", "#a", "a b", "a/b", "*" * 2, "x" * 256, 5, None]:
        assert not is_valid_pattern(bad), bad


# ---------------------------------------------------------------------------------------------------- queues
async def test_declare_changes_every_option_and_is_idempotent(open_store: Opener) -> None:
    store = await open_store()
    options = QueueOptions(
        max_attempts=3,
        dead_letter="graves",
        max_length=10,
        max_bytes=1000,
        overflow="dead_letter",
        retry_delay=1.5,
        retry_backoff=3.0,
        retry_max_delay=60.0,
        message_ttl=3600.0,
        expired="drop",
        dedup_window=30.0,
    )
    await one(store, Declare("jobs", options))
    await publish(store, "jobs", b"a")
    await one(store, Declare("jobs", options))
    store = await open_store.reopen(store)
    s = await stats(store, "jobs")
    assert s.options == options and s.total == 1
    d = s.as_dict()
    assert (d["overflow"], d["retry_delay"], d["message_ttl"], d["expired"], d["dedup_window"]) == (
        "dead_letter",
        1.5,
        3600.0,
        "drop",
        30.0,
    )
    await one(store, Declare("jobs", QueueOptions()))  # replaced as a whole: back to the defaults
    store = await open_store.reopen(store)
    assert (await stats(store, "jobs")).options == QueueOptions()


async def test_bindings_per_queue_are_capped_and_bind_counts_toward_max_queues(open_store: Opener) -> None:
    store = await open_store(max_queues=1)
    results = await run(store, *(Bind("q", f"p{i}.#") for i in range(MAX_BINDINGS)))
    assert results == [None] * MAX_BINDINGS
    err = await refused(store, Bind("q", "one.more"), ErrorCode.BAD_REQUEST)
    assert str(MAX_BINDINGS) in err.message
    assert await run(store, Bind("q", "p0.#")) == [None]  # binding again is a no-op, not one more
    await refused(store, Bind("other", "x"), ErrorCode.TOO_MANY_QUEUES)
