"""Message history through the store contract: what a queue declared with ``history`` records of each message's
life, in order, durably, within its retention; and that a queue without it records nothing. Runs once per engine
(the ``open_store`` fixture); the last ones look inside LMDB itself."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import msgpack
import pytest

from replika_protocol import ErrorCode
from replika_server.store import (
    Declare,
    DeleteQueue,
    Expire,
    Fetch,
    History,
    HistoryList,
    HistoryOptions,
    MessageHistory,
    Nack,
    Publish,
    Purge,
    QueueOptions,
    Redrive,
    Reject,
    Release,
    Store,
    Touch,
)
from replika_server.store._engine import SCHEMA_VERSION
from tests.engines import LmdbOpener, Opener
from tests.test_store import (
    ATTEMPTS,
    ID,
    SHORT,
    ack,
    fetch,
    leases,
    let_time_pass,
    let_timer_pass,
    one,
    publish,
    refused,
    stats,
)

ON = HistoryOptions()


def kinds(h: MessageHistory) -> list[str]:
    return [e.kind.value for e in h.events]


async def declare(store: Store, queue: str, history: HistoryOptions | None = ON, **options: object) -> None:
    await one(store, Declare(queue, QueueOptions(history=history, **options)))  # type: ignore[arg-type]


async def history(store: Store, queue: str, mid: int) -> MessageHistory:
    return await one(store, History(queue, mid))


async def test_a_whole_life_reads_back_in_order(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "jobs", max_attempts=2, dead_letter="jobs.dlq")
    await declare(store, "jobs.dlq")
    await one(store, Publish("jobs", [b"job"], [{"trace": "t-1"}], owner=7, by="alice"))
    [first] = await fetch(store, "jobs", lease=SHORT, owner=11)
    await one(store, Nack("jobs", leases([first]), 11, delay=0.0))
    [second] = await fetch(store, "jobs", lease=SHORT, owner=12)
    assert second[ATTEMPTS] == 2
    let_timer_pass(store)  # the lease ends; at max_attempts the message is dead-lettered
    await one(store, Expire())
    assert await one(store, Redrive("jobs.dlq", None, 10)) == 1
    [third] = await fetch(store, "jobs", owner=13)
    assert await ack(store, "jobs", [third], owner=13) == {}

    store = await open_store.reopen(store)  # and all of it is durable
    h = await history(store, "jobs", first[ID])
    assert kinds(h) == ["published", "delivered", "nacked", "delivered", "lease_expired", "dead_lettered"]
    assert h.headers == {"trace": "t-1"} and h.payload is None and h.state == "dead_lettered"
    published, d1, nacked, d2, expired, dead = h.events
    assert (published.connection, published.detail["by"]) == (7, "alice")
    assert (d1.attempt, d1.connection, d2.attempt, d2.connection) == (1, 11, 2, 12)
    assert (nacked.connection, nacked.detail["delay"]) == (11, 0.0)
    assert (expired.attempt, expired.connection) == (2, 12)
    assert dead.detail["reason"] == "max_attempts" and dead.detail["to"] == "jobs.dlq"
    assert [e.at for e in h.events] == sorted(e.at for e in h.events)

    in_dlq = await history(store, "jobs.dlq", dead.detail["id"])
    assert kinds(in_dlq) == ["published", "redriven"]
    assert in_dlq.events[0].detail["from"] == "jobs" and in_dlq.events[0].detail["from_id"] == first[ID]
    assert in_dlq.events[1].detail["to"] == "jobs" and in_dlq.events[1].detail["id"] == third[ID]

    back = await history(store, "jobs", third[ID])
    assert kinds(back) == ["published", "delivered", "acked"] and back.state == "acked"
    assert back.events[0].detail["from"] == "jobs.dlq" and back.events[2].connection == 13


async def test_touch_reject_release_purge_ttl_and_overflow_are_recorded(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "q", max_length=2, overflow="drop_oldest")
    a, b, c = await publish(store, "q", b"a", b"b") + await publish(store, "side", b"-")
    [da, db] = await fetch(store, "q", max=2, owner=1)
    await one(store, Touch("q", leases([da]), 1, lease=60.0))
    await one(store, Reject("q", leases([db]), 1))
    await one(store, Release(1))  # its connection closed
    c, d = await publish(store, "q", b"c") + await publish(store, "q", b"d")  # full: the oldest ready (a) goes
    released = await history(store, "q", a)
    assert kinds(released) == ["published", "delivered", "touched", "lease_expired", "dropped"]
    assert released.events[3].detail["closed"] is True and released.events[4].detail["reason"] == "overflow"
    rejected = await history(store, "q", b)
    assert rejected.events[-1].detail["reason"] == "rejected" and rejected.state == "dead_lettered"
    assert await one(store, Purge("q")) == 2
    assert kinds(await history(store, "q", c)) == ["published", "purged"]
    assert (await history(store, "q", d)).state == "purged"

    await declare(store, "ttl", message_ttl=10.0, expired="drop")
    [e] = await publish(store, "ttl", b"e")
    let_time_pass(store, 10.0)
    await one(store, Expire())
    assert kinds(await history(store, "ttl", e)) == ["published", "expired"]


async def test_listing_filters_by_state_time_and_header(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "q")
    [a] = await publish(store, "q", b"a", headers=[{"trace": "t-1"}])
    let_time_pass(store, 10.0)
    [b] = await publish(store, "q", b"b", headers=[{"trace": "t-2"}])
    [delivery] = await fetch(store, "q", max=1)
    await ack(store, "q", [delivery])
    listed = await one(store, HistoryList("q"))
    assert [m.id for m in listed] == [b, a]  # newest first
    assert [m.id for m in await one(store, HistoryList("q", state="acked"))] == [a]
    assert [m.id for m in await one(store, HistoryList("q", state="waiting"))] == [b]
    assert [m.id for m in await one(store, HistoryList("q", header=("trace", "t-2")))] == [b]
    since = listed[0].published_at
    assert [m.id for m in await one(store, HistoryList("q", since=since))] == [b]
    assert [m.id for m in await one(store, HistoryList("q", until=since - 1))] == [a]
    assert [m.id for m in await one(store, HistoryList("q", max=1))] == [b]


async def test_payloads_are_kept_only_when_asked(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "keep", HistoryOptions(payloads=True))
    [mid] = await publish(store, "keep", b"body")
    await ack(store, "keep", await fetch(store, "keep"))
    assert (await history(store, "keep", mid)).payload == b"body"


async def test_retention_deletes_old_history_by_time_and_count(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "q", HistoryOptions(retention=60.0, max_messages=2))
    a, b = await publish(store, "q", b"a", b"b")
    await ack(store, "q", await fetch(store, "q", max=1))  # a
    [c] = await publish(store, "q", b"c")
    await refused(store, History("q", a), ErrorCode.NOT_FOUND)  # past max_messages: the oldest went first
    await ack(store, "q", await fetch(store, "q", max=1))  # b ends now
    let_time_pass(store, 30.0)
    await one(store, Expire())
    assert kinds(await history(store, "q", b)) == ["published", "delivered", "acked"]
    let_time_pass(store, 31.0)
    await one(store, Expire())
    await refused(store, History("q", b), ErrorCode.NOT_FOUND)
    assert kinds(await history(store, "q", c)) == ["published"]  # still in the queue: kept
    store = await open_store.reopen(store)  # retention state is rebuilt
    [d] = await publish(store, "q", b"d")
    assert [m.id for m in await one(store, HistoryList("q"))] == [d, c]


async def test_history_off_records_nothing_and_turning_it_off_forgets(open_store: Opener) -> None:
    store = await open_store()
    [mid] = await publish(store, "plain", b"x")
    await refused(store, History("plain", mid), ErrorCode.NOT_FOUND)
    assert await one(store, HistoryList("plain")) == []
    await declare(store, "q")
    [mid] = await publish(store, "q", b"x")
    assert (await stats(store, "q")).options.history == ON
    await declare(store, "q", None)
    await refused(store, History("q", mid), ErrorCode.NOT_FOUND)
    await declare(store, "q")
    await refused(store, History("q", mid), ErrorCode.NOT_FOUND)
    await one(store, DeleteQueue("q"))
    await refused(store, History("q", mid), ErrorCode.NOT_FOUND)


async def test_declared_history_survives_a_reopen(open_store: Opener) -> None:
    store = await open_store()
    options = HistoryOptions(retention=5.0, max_messages=9, payloads=True)
    await declare(store, "q", options)
    store = await open_store.reopen(store)
    assert (await stats(store, "q")).options.history == options
    [mid] = await publish(store, "q", b"x")
    store = await open_store.reopen(store)
    await one(store, Fetch("q", 1, 30.0, 1))
    assert kinds(await history(store, "q", mid)) == ["published", "delivered"]


async def test_lmdb_writes_no_history_for_a_queue_without_it(tmp_path: Path) -> None:
    opener = LmdbOpener(tmp_path / "store")
    try:
        store = await opener()
        await publish(store, "plain", b"x")
        await ack(store, "plain", await fetch(store, "plain"))
        with store._env.begin(db=store._events_db) as txn:
            assert txn.stat(store._events_db)["entries"] == 0
    finally:
        await opener.close()


async def test_one_batch_past_max_messages_keeps_the_newest(open_store: Opener) -> None:
    store = await open_store()
    await declare(store, "q", HistoryOptions(max_messages=3))
    ids = await publish(store, "q", *(b"m%d" % i for i in range(10)))
    await ack(store, "q", await fetch(store, "q", max=10))
    store = await open_store.reopen(store)
    assert [m.id for m in await one(store, HistoryList("q"))] == ids[:-4:-1]
    assert kinds(await history(store, "q", ids[-1])) == ["published", "delivered", "acked"]
    await refused(store, History("q", ids[0]), ErrorCode.NOT_FOUND)


async def test_events_of_one_batch_keep_each_messages_attempt_and_connection(open_store: Opener) -> None:
    """Recording packs alike events once: a batch mixing attempts, details and connections must still record
    each message's own."""
    store = await open_store()
    await declare(store, "mixed")
    ids = await publish(store, "mixed", b"a", b"b", b"c")
    await one(store, Publish("mixed", [b"d", b"e"], [{"k": "1"}, {"k": "2"}], owner=5, by="bob"))
    [first] = await fetch(store, "mixed", max=1, owner=3)
    await one(store, Nack("mixed", leases([first]), 3, delay=0.0))
    batch = await fetch(store, "mixed", max=10, owner=4)
    assert [d[ATTEMPTS] for d in batch] == [2, 1, 1, 1, 1]
    assert await ack(store, "mixed", batch[:2], owner=4) == {}
    assert await ack(store, "mixed", batch[2:], owner=9) == {}
    lives = [await history(store, "mixed", mid) for mid in [*ids, ids[-1] + 1, ids[-1] + 2]]
    assert [kinds(h) for h in lives] == [
        ["published", "delivered", "nacked", "delivered", "acked"],
        *[["published", "delivered", "acked"]] * 4,
    ]
    assert [[e.attempt for e in h.events if e.kind.value == "delivered"] for h in lives] == [[1, 2], *[[1]] * 4]
    assert [h.events[-1].connection for h in lives] == [4, 4, 9, 9, 9]
    assert [h.headers for h in lives] == [None, None, None, {"k": "1"}, {"k": "2"}]
    assert [h.events[0].connection for h in lives][3:] == [5, 5]
    assert {h.events[0].detail.get("by") for h in lives[3:]} == {"bob"}


async def test_pruning_part_of_a_batch_keeps_the_rest_of_it_across_a_reopen(open_store: Opener) -> None:
    """The events of a batch that differ only by message may share a record: deleting the history of some of its
    messages, by count or by time, must keep the others'."""
    store = await open_store()
    await declare(store, "q", HistoryOptions(retention=60.0, max_messages=5))
    ids = await publish(store, "q", *(b"m%d" % i for i in range(4)))
    batch = await fetch(store, "q", max=4)
    await ack(store, "q", batch[1:2])  # ids[1] ends now
    let_time_pass(store, 30.0)
    await ack(store, "q", batch[2:])  # ids[2] and ids[3] end 30 s later
    newer = await publish(store, "q", b"m4", b"m5")  # one past max_messages: ids[0] goes
    store = await open_store.reopen(store)
    await refused(store, History("q", ids[0]), ErrorCode.NOT_FOUND)
    assert [kinds(await history(store, "q", mid)) for mid in ids[1:]] == [["published", "delivered", "acked"]] * 3
    let_time_pass(store, 31.0)  # past ids[1]'s retention, not the others'
    await one(store, Expire())
    store = await open_store.reopen(store)
    await refused(store, History("q", ids[1]), ErrorCode.NOT_FOUND)
    assert [kinds(await history(store, "q", mid)) for mid in ids[2:]] == [["published", "delivered", "acked"]] * 2
    assert [m.id for m in await one(store, HistoryList("q"))] == [*newer[::-1], ids[3], ids[2]]
    let_time_pass(store, 30.0)  # and now past theirs (a timer rebuilt on open)
    await one(store, Expire())
    store = await open_store.reopen(store)
    assert [m.id for m in await one(store, HistoryList("q"))] == newer[::-1]
    assert kinds(await history(store, "q", newer[0])) == ["published"]


async def test_lmdb_records_a_batchs_alike_events_once(tmp_path: Path) -> None:
    """A batch's publish, delivery and ack of messages without headers are one record each, not one per message:
    that is most of history's cost on the batched paths."""
    opener = LmdbOpener(tmp_path / "store")
    try:
        store = await opener()
        await declare(store, "q")
        ids = await publish(store, "q", *(b"m%d" % i for i in range(100)))
        await ack(store, "q", await fetch(store, "q", max=100))
        with store._env.begin(db=store._events_db) as txn:
            assert txn.stat(store._events_db)["entries"] == 3
        assert {tuple(kinds(await history(store, "q", mid))) for mid in ids} == {("published", "delivered", "acked")}
    finally:
        await opener.close()


async def test_lmdb_store_of_schema_2_has_its_history_moved_on_open(tmp_path: Path) -> None:
    """Schema 2 kept one record per event under (queue, message, sequence) in a ``history`` database."""
    opener = LmdbOpener(tmp_path / "store")
    try:
        store = await opener()
        await declare(store, "q")
        ids = await publish(store, "q", b"a", b"b")
        await ack(store, "q", await fetch(store, "q", max=1))
        await store.close()
        env = lmdb.open(str(opener.path), max_dbs=6)
        with env.begin(write=True) as txn:
            events, old = env.open_db(b"events", txn=txn), env.open_db(b"history", txn=txn)
            seq = 0  # schema 2 gave every event a sequence of its own
            for key, value in list(txn.cursor(db=events)):
                qnum = struct.unpack(">IQ", key)[0]
                (size,) = struct.unpack_from(">I", value)
                head = value[4 : 4 + size]
                for (mid,) in struct.iter_unpack("<Q", value[4 + size :]):
                    seq += 1
                    txn.put(struct.pack(">IQQ", qnum, mid, seq), head, db=old)
            txn.drop(events, delete=False)
            txn.put(b"schema", b"2", db=env.open_db(b"meta", txn=txn))
        env.close()

        store = await opener()
        assert kinds(await history(store, "q", ids[0])) == ["published", "delivered", "acked"]
        assert kinds(await history(store, "q", ids[1])) == ["published"]
        await ack(store, "q", await fetch(store, "q", max=1))
        store = await opener.reopen(store)
        assert kinds(await history(store, "q", ids[1])) == ["published", "delivered", "acked"]
        assert msgpack.unpackb(head, raw=False)[1] in {"published", "delivered", "acked"}
        with store._env.begin() as txn:
            assert txn.get(b"schema", db=store._meta_db) == SCHEMA_VERSION
            with pytest.raises(lmdb.NotFoundError):
                store._env.open_db(b"history", txn=txn, create=False)
    finally:
        await opener.close()
