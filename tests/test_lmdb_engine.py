"""The LMDB engine's own promises, beyond the store contract: what it keeps in memory and in LMDB, how it grows its
map, and how it reads stores that older versions wrote. The contract itself (test_store*.py, the state machine)
runs against LMDB through the ``store`` fixtures; the tests here open :class:`LmdbStore` directly."""

from __future__ import annotations

import sys
from pathlib import Path

import lmdb
import msgpack

from replika_server.store import Ack, Declare, DeleteQueue, Expire, Fetch, Publish, Published, QueueOptions, Release
from replika_server.store._delivery import DEDUP_PRUNE_SLACK
from replika_server.store._engine import SCHEMA_VERSION
from replika_server.store._records import encode_message, pack_key
from replika_server.store._topics import topic_matches
from replika_server.store.lmdb_engine import LmdbStore, _commits_inline
from tests.engines import LmdbOpener, LmdbSpace
from tests.test_store import LONG, MIB, ack, counts, fetch, let_time_pass, one, publish, run
from tests.test_store_features import TOPIC_CASES
from tests.test_store_limits import check_bytes, headers_size


def dedup_entries(store: LmdbStore) -> int:
    with store._env.begin(db=store._dedup_db) as txn:
        entries: int = txn.stat(store._dedup_db)["entries"]
    return entries


# ---------------------------------------------------------------------------------------------------- memory
async def test_an_acked_message_leaves_no_record_behind_until_its_lease_would_have_ended(
    open_lmdb: LmdbOpener,
) -> None:
    # Pending lease deadlines name messages by id: a record held there until its deadline kept every message of
    # the last lease period alive under load, and the garbage collector walked them all.
    store = await open_lmdb()
    await publish(store, "jobs", *[b"x"] * 100)
    delivered = await fetch(store, "jobs", max=100, lease=LONG)
    records = list(store._queues["jobs"].tracked.values())
    assert len(records) == 100
    assert await ack(store, "jobs", delivered) == {}
    assert store._lease_heap  # the deadline is still pending; it goes stale, as before
    # Nothing but this list (and getrefcount's own argument) refers to them any more: they are freed with it.
    assert {sys.getrefcount(records[i]) for i in range(len(records))} == {2}


async def test_the_retry_delay_is_capped_however_many_the_attempts(open_lmdb: LmdbOpener) -> None:
    # Attempts no test can reach through the interface: the cap applies, and the power does not overflow a float.
    store = await open_lmdb()
    await one(store, Declare("jobs", QueueOptions(retry_delay=10.0, retry_backoff=3.0, retry_max_delay=50.0)))
    q = store._queues["jobs"]
    assert [q.retry_delay(a) for a in (1, 2, 3, 4, 100_000)] == [10.0, 30.0, 50.0, 50.0, 50.0]
    await one(store, Declare("jobs", QueueOptions(retry_delay=1.0, retry_backoff=100.0)))
    assert store._queues["jobs"].retry_delay(10_000) == 30 * 86400.0  # no cap given: 30 days, no overflow


# ---------------------------------------------------------------------------------------------------- dedup
async def test_dedup_ids_are_pruned_from_memory_and_lmdb_after_their_window(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb()
    await one(store, Declare("jobs", QueueOptions(dedup_window=0.3)))
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))
    store = await open_lmdb.reopen(store)
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))  # a repeat: nothing new to remember
    let_time_pass(store, 0.2)
    await one(store, Publish("jobs", [b"b"], dedup_ids=["y"]))
    let_time_pass(store, 0.1)
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(3, 1, [3])  # "x" is new again
    assert dedup_entries(store) == 2  # "x" once (its new first sighting replaced the old), "y"
    let_time_pass(store, 0.3 + DEDUP_PRUNE_SLACK)  # past every window and the prune slack
    await run(store, Expire())
    assert len(store._queues["jobs"].dedup) == 0  # forgotten, in LMDB too
    assert dedup_entries(store) == 0
    store = await open_lmdb.reopen(store)
    assert len(store._queues["jobs"].dedup) == 0


async def test_deleting_a_queue_deletes_its_dedup_records(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb()
    await one(store, Publish("jobs", [b"a"], dedup_ids=["x"]))
    await one(store, DeleteQueue("jobs"))
    store = await open_lmdb.reopen(store)
    assert await one(store, Publish("jobs", [b"a"], dedup_ids=["x"])) == Published(1, 1, [1])
    assert dedup_entries(store) == 1  # the new queue's only


# ---------------------------------------------------------------------------------------------------- the map
async def test_the_map_grows_on_demand_up_to_max_size(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb(map_size=MIB, max_size=16 * MIB)
    payload = b"g" * 60_000
    for _ in range(8):  # about 5 MiB: five times the first map
        await publish(store, "big", *[payload] * 10)
    assert store._env.info()["map_size"] > MIB
    store = await open_lmdb.reopen(store, map_size=MIB, max_size=16 * MIB)
    assert await counts(store, "big") == (80, 0, 0, 80)
    assert all(d[4] == payload for d in await fetch(store, "big"))


# ---------------------------------------------------------------------------------------------------- older stores
async def test_a_store_of_the_previous_schema_opens_and_is_upgraded(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb()
    await publish(store, "jobs", b"a", b"b")
    await fetch(store, "jobs", max=1)
    await store.close()
    env = lmdb.open(str(open_lmdb.path), max_dbs=5)
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"1", db=env.open_db(b"meta", txn=txn))
    env.close()
    store = await open_lmdb()
    assert await counts(store, "jobs") == (2, 0, 0, 2)
    with store._env.begin() as txn:
        assert txn.get(b"schema", db=store._meta_db) == SCHEMA_VERSION


async def test_a_store_written_before_byte_accounting_is_counted_on_load(open_lmdb: LmdbOpener, tmp_path: Path) -> None:
    space = LmdbSpace(tmp_path)
    store = await open_lmdb()
    await publish(store, "jobs", b"1" * 10, b"2" * 20, b"3" * 30, headers=[None, {"k": "v"}, None])
    await publish(store, "other", b"x")
    await fetch(store, "jobs", max=1)
    expected = {name: s.bytes for name, s in (await check_bytes(space, store)).items()}
    await store.close()
    # Rewrite the meta records as the previous version wrote them: no bytes, no limits.
    env = lmdb.open(str(open_lmdb.path), max_dbs=4)
    meta_db = env.open_db(b"meta")
    with env.begin(write=True, db=meta_db) as txn:
        for name in expected:
            meta = msgpack.unpackb(txn.get(b"q:" + name.encode()), raw=False)
            for k in ("bytes", "max_length", "max_bytes"):
                del meta[k]
            txn.put(b"q:" + name.encode(), msgpack.packb(meta, use_bin_type=True))
    env.close()

    store = await open_lmdb()

    assert {name: s.bytes for name, s in (await check_bytes(space, store)).items()} == expected
    with store._env.begin(db=store._meta_db) as txn:  # the first commit recorded the figures
        assert msgpack.unpackb(txn.get(b"q:jobs"), raw=False)["bytes"] == expected["jobs"]


# ---------------------------------------------------------------------------------------------------- test support
async def test_the_contract_suites_count_of_what_lmdb_holds(open_lmdb: LmdbOpener, tmp_path: Path) -> None:
    # The byte accounting checks of the contract suite are only as good as this brute-force count.
    space = LmdbSpace(tmp_path)
    store = await open_lmdb()
    headers = {"k": "v"}
    await publish(store, "jobs", b"abc", headers=[headers])
    await one(store, Publish("jobs", [b"de"], priority=7))  # another lane: another storage prefix, same queue
    await publish(store, "other", b"f")
    assert space.holdings(store) == {"jobs": (2, 3 + headers_size(headers) + 2), "other": (1, 1)}
    await store.close()
    # A message under a prefix that no queue owns is counted apart, so that check_bytes fails on it.
    env = lmdb.open(str(open_lmdb.path), max_dbs=5)
    with env.begin(write=True) as txn:
        txn.put(pack_key(9999, 1), encode_message(0.0, b"stray", None), db=env.open_db(b"msgs", txn=txn))
    env.close()
    store = await open_lmdb()
    held = space.holdings(store)
    assert held.pop("<prefix 9999 of no queue>") == (1, 5)
    assert held == {"jobs": (2, 3 + headers_size(headers) + 2), "other": (1, 1)}


def test_topic_matches() -> None:
    # The matcher the engine routes topics with, on its own; test_store_features checks the same cases end to end.
    for pattern, topic, expected in TOPIC_CASES:
        assert topic_matches(tuple(pattern.split(".")), topic.split(".")) is expected, (pattern, topic)


def test_a_batch_commits_on_the_loop_only_when_nothing_else_could_be_parsed_meanwhile() -> None:
    fetch, ack = Fetch("q", 500, 30.0, 7), Ack("q", [(1, 1)], 7)
    assert _commits_inline([fetch])  # a lone request
    assert _commits_inline([fetch, ack, Expire()])  # one consumer's requests, and a timer's op
    assert _commits_inline([Publish("q", [b"x"], owner=0), fetch])  # owner 0: the admin API, no connection
    assert not _commits_inline([fetch, Ack("q", [(1, 1)], 8)])  # two connections: parse one during the other's
    assert not _commits_inline([Release(8), fetch])
