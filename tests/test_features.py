"""The messaging features through the SDK against a real server: peek, redrive, delays, retries with backoff,
TTL, priorities, overflow, deduplication, topics and queue management; their wire validation and permissions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replika
from replika_protocol import ErrorCode, Frame
from replika_server.requests import Limits, RequestError, parse_op
from tests.conftest import WAIT, RunningServer, ServerProcess, restart, serving
from tests.raw import Raw
from tests.tokens import ADMIN, ORDERS, READER

DLQ_QUEUE = "replika-dead-letter-queue"


# ---------------------------------------------------------------------------------------------------- peek
async def test_peek_reads_without_leasing(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("jobs", [b"1", b"2", b"3"], headers=[{"k": "v"}, None, None])
        [first] = await client.fetch("jobs")
        await first.nack()
        peeked = await client.peek("jobs", max=2)
        assert [(p.id, p.attempts, p.payload, p.headers) for p in peeked] == [
            (1, 1, b"1", {"k": "v"}),
            (2, 0, b"2", {}),
        ]
        assert peeked[0].published_at == first.published_at and peeked[0].queue == "jobs"
        stats = await client.stats("jobs")
        assert (stats["ready"], stats["in_flight"]) == (3, 0)
        assert [m.attempts for m in await client.fetch("jobs", max=3)] == [2, 1, 1]
        with pytest.raises(replika.NotFound):
            await client.peek("missing")
        assert "missing" not in [q["queue"] for q in await client.queues()]


# ---------------------------------------------------------------------------------------------------- redrive
async def test_redrive_moves_dead_letters_back_and_survives_a_restart(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("orders", [b"a", b"b", b"c"], headers=[{"trace": "1"}, None, None])
        msgs = await client.fetch("orders", max=3)
        await client.reject(msgs)
        await client.publish("orders.dlq", b"stray")  # no dead-letter header: stays
        assert [p.headers.get(DLQ_QUEUE) for p in await client.peek("orders.dlq", max=10)] == [
            "orders",
            "orders",
            "orders",
            None,
        ]
        assert await client.redrive("orders.dlq", max=1) == 1
        assert await client.redrive("orders.dlq") == 2
        assert await client.redrive("orders.dlq") == 0
        back = await client.fetch("orders", max=10)
        assert [(m.payload, m.headers, m.attempts) for m in back] == [
            (b"a", {"trace": "1"}, 1),
            (b"b", {}, 1),
            (b"c", {}, 1),
        ]
        assert await client.redrive("orders.dlq", to="elsewhere") == 1
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        assert [m.payload for m in await client.fetch("elsewhere")] == [b"stray"]
        assert (await client.stats("orders"))["ready"] == 3  # the leases ended with the restart
        assert (await client.stats("orders.dlq"))["total"] == 0
        with pytest.raises(replika.NotFound):
            await client.redrive("missing")


def test_blocking_client_peeks_and_redrives(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.publish("q", b"x")
        client.fetch("q")[0].reject(wait=True)  # a peek sees only what was committed before its batch
        [p] = client.peek("q.dlq", max=5)
        assert (p.payload, p.attempts, p.headers[DLQ_QUEUE]) == (b"x", 0, "q")
        assert client.redrive("q.dlq") == 1
        assert [m.payload for m in client.fetch("q")] == [b"x"]


# ---------------------------------------------------------------------------------------------------- permissions
async def test_peek_needs_consume_or_admin_and_redrive_needs_admin(tmp_path: Path, auth_file: Path) -> None:
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ADMIN) as admin,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
        replika.AsyncClient(srv.url, token=READER) as reader,
    ):
        await admin.publish("orders.eu", b"1")
        await admin.publish("orders", b"2")
        assert [p.payload for p in await reader.peek("orders.eu")] == [b"1"]
        assert [p.payload for p in await orders.peek("orders.eu")] == [b"1"]
        with pytest.raises(replika.Forbidden):
            await orders.peek("orders")  # may publish there, not consume
        assert [p.payload for p in await admin.peek("orders")] == [b"2"]
        [msg] = await admin.fetch("orders")
        await msg.reject()
        with pytest.raises(replika.Forbidden):
            await orders.redrive("orders.dlq", max=5)
        assert await admin.redrive("orders.dlq") == 1


async def test_peek_and_redrive_on_the_wire(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    reply = await conn.request({"id": 1, "op": "publish", "queue": "w", "payloads": [b"p"], "headers": [{"h": "v"}]})
    assert reply["ok"] is True
    reply = await conn.request({"id": 2, "op": "peek", "queue": "w", "max": 10})
    assert reply["ok"] is True
    [[mid, attempts, published_at, payload, headers]] = reply["msgs"]
    assert (mid, attempts, payload, headers) == (1, 0, b"p", {"h": "v"}) and isinstance(published_at, float)
    reply = await conn.request({"id": 3, "op": "redrive", "queue": "w", "to": "w2"})
    assert reply == {"moved": 1, "id": 3, "ok": True}
    reply = await conn.request({"id": 4, "op": "redrive", "queue": "w"})
    assert reply["moved"] == 0
    reply = await conn.request({"id": 5, "op": "peek", "queue": "w2"})
    assert [m[3] for m in reply["msgs"]] == [b"p"]
    await conn.close()


async def wait_for_stats(client: replika.AsyncClient, queue: str, **expected: int) -> dict[str, Any]:
    """Poll stats until every ``expected`` count holds: timers run on the server, not on our call."""
    deadline = time.monotonic() + WAIT
    while True:
        stats = await client.stats(queue)
        if all(stats[k] == v for k, v in expected.items()):
            return stats
        assert time.monotonic() < deadline, f"{queue} never reached {expected}: {stats}"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------------- 1. delays
async def test_delayed_messages_through_the_sdk_and_a_restart(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("d", b"now")
        await client.publish("d", b"soon", delay=0.3)
        await client.publish_many("d", [b"later-1", b"later-2"], delay=3600)
        stats = await client.stats("d")
        assert (stats["ready"], stats["delayed"], stats["total"]) == (1, 3, 4)
        [now] = await client.fetch("d")
        assert now.payload == b"now"
        started = time.monotonic()
        [soon] = await client.fetch("d", wait=WAIT)  # a long poll is woken when the delay runs out
        assert soon.payload == b"soon" and time.monotonic() - started > 0.1
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        stats = await client.stats("d")
        assert (stats["ready"], stats["delayed"]) == (2, 2)  # the leases ended; the long delays did not
        assert [m.payload for m in await client.fetch("d", max=10)] == [b"now", b"soon"]


# ---------------------------------------------------------------------------------------------------- 2. retries
async def test_retries_back_off_exponentially(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("r", retry_delay=0.2, retry_backoff=2.0, retry_max_delay=0.3)
        await client.publish("r", b"flaky")
        [first] = await client.fetch("r")
        await first.nack()  # no delay: the queue's (0.2 s after the first attempt)
        stats = await client.stats("r")
        assert (stats["delayed"], stats["retry_delay"], stats["retry_backoff"], stats["retry_max_delay"]) == (
            1,
            0.2,
            2.0,
            0.3,
        )
        started = time.monotonic()
        [second] = await client.fetch("r", wait=WAIT)
        assert second.attempts == 2 and time.monotonic() - started > 0.1
        # An expired lease backs off too: 0.4 s after the second attempt, capped at 0.3.
        await client.touch(second, lease=0.05)
        await wait_for_stats(client, "r", delayed=1)
        [third] = await client.fetch("r", wait=WAIT)
        assert third.attempts == 3
        await third.nack(delay=0)  # explicit: at once
        assert (await client.stats("r"))["ready"] == 1


# ---------------------------------------------------------------------------------------------------- 3. TTL
async def test_ttl_dead_letters_or_drops_expired_messages(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("t", b"short", ttl=0.1)
        await client.publish("t", b"long", ttl=3600)
        await wait_for_stats(client, "t", total=1)  # gone without anyone fetching
        [dead] = await client.fetch("t.dlq")
        assert dead.payload == b"short" and dead.headers["replika-dead-letter-reason"] == "expired"
        await client.declare("t2", message_ttl=0.1, expired="drop")
        await client.publish_many("t2", [b"1", b"2"])
        stats = await wait_for_stats(client, "t2", total=0)
        assert stats["counters"]["dropped"] == 2 and stats["message_ttl"] == 0.1 and stats["expired"] == "drop"
        assert [m.payload for m in await client.fetch("t")] == [b"long"]


# ---------------------------------------------------------------------------------------------------- 4. priorities
async def test_priorities_through_the_sdk(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("p", [b"low-1", b"low-2"])
        await client.publish("p", b"urgent", priority=9)
        await client.publish_many("p", [b"mid-1", b"mid-2"], priority=4)
        msgs = await client.fetch("p", max=10)
        assert [m.payload for m in msgs] == [b"urgent", b"mid-1", b"mid-2", b"low-1", b"low-2"]
        await client.nack(msgs)
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        assert [m.payload for m in await client.fetch("p", max=10)] == [
            b"urgent",
            b"mid-1",
            b"mid-2",
            b"low-1",
            b"low-2",
        ]
        with pytest.raises(ValueError):
            await client.publish("p", b"x", priority=10)


# ---------------------------------------------------------------------------------------------------- 5. limits
async def test_overflow_policies_through_the_sdk(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("full", max_length=2)
        await client.publish_many("full", [b"1", b"2"])
        with pytest.raises(replika.QueueFull):
            await client.publish("full", b"3")
        await client.declare("ring", max_length=2, overflow="drop_oldest")
        with pytest.raises(replika.QueueFull):
            await client.publish_many("ring", [b"1", b"2", b"3"])  # more than the queue can ever hold at once
        for i in range(5):
            await client.publish("ring", str(i).encode())
        assert [p.payload for p in await client.peek("ring", max=10)] == [b"3", b"4"]
        await client.declare("spill", max_bytes=4, overflow="dead_letter", dead_letter="spilled")
        await client.publish_many("spill", [b"ab", b"cd"])
        await client.publish("spill", b"efg")
        assert [p.payload for p in await client.peek("spill", max=10)] == [b"efg"]
        spilled = await client.fetch("spilled", max=10)
        assert [(m.payload, m.headers["replika-dead-letter-reason"]) for m in spilled] == [
            (b"ab", "overflow"),
            (b"cd", "overflow"),
        ]
        stats = await client.stats("spill")
        assert (stats["overflow"], stats["max_bytes"], stats["bytes"]) == ("dead_letter", 4, 3)


# ---------------------------------------------------------------------------------------------------- 6. dedup
async def test_dedup_through_the_sdk_and_a_restart(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first = await client.publish("dd", b"order-1", dedup_id="order-1")
        assert await client.publish("dd", b"order-1 again", dedup_id="order-1") == first
        ids = await client.publish_many("dd", [b"a", b"b", b"a"], dedup_ids=["A", None, "A"])
        assert ids[0] == ids[2] != ids[1]
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        assert await client.publish("dd", b"order-1 after restart", dedup_id="order-1") == first
        stats = await client.stats("dd")
        assert (stats["total"], stats["dedup_window"]) == (3, 120.0)
        assert [m.payload for m in await client.fetch("dd", max=10)] == [b"order-1", b"a", b"b"]
        await client.declare("dd", dedup_window=0)
        assert await client.publish("dd", b"x", dedup_id="order-1") != first


def test_blocking_client_features(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.declare("b", retry_delay=3600, message_ttl=3600, overflow="drop_oldest", max_length=10)
        client.bind("b", "events.#")
        assert client.publish_topic("events.x", b"e", priority=2, dedup_id="e1") == {"b": 1}
        assert client.publish_topic("events.y", b"e", dedup_id="e1") == {"b": 1}
        assert client.publish("b", b"later", delay=3600, ttl=7200) == 2
        assert client.publish_many("b", [b"x", b"y"], dedup_ids=["x", "x"]) == [3, 3]
        [msg] = client.fetch("b")
        assert msg.payload == b"e"
        msg.nack()  # the queue's retry delay: an hour
        stats = client.stats("b")
        assert (stats["delayed"], stats["ready"], stats["bindings"]) == (2, 1, ["events.#"])
        client.unbind("b", "events.#")
        assert client.publish_topic("events.z", b"nobody") == {}


# ---------------------------------------------------------------------------------------------------- 7. topics
async def test_topics_fan_out_and_bindings_survive_a_restart(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.bind("audit", "#")
        await client.bind("eu-orders", "orders.eu.*")
        await client.bind("created", "*.*.created")
        assert await client.publish_topic("orders.eu.created", b"o1", headers={"k": "v"}) == {
            "audit": 1,
            "created": 1,
            "eu-orders": 1,
        }
        assert await client.publish_topic("orders.us.created", b"o2") == {"audit": 2, "created": 2}
        listed = {q["queue"]: q["bindings"] for q in await client.queues()}
        assert listed == {"audit": ["#"], "created": ["*.*.created"], "eu-orders": ["orders.eu.*"]}
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        assert (await client.stats("eu-orders"))["bindings"] == ["orders.eu.*"]
        assert await client.publish_topic("orders.eu.paid", b"o3") == {"audit": 3, "eu-orders": 2}
        [m] = await client.fetch("created")
        assert (m.payload, m.headers) == (b"o1", {"k": "v"})
        await client.unbind("audit", "#")
        await client.delete_queue("created")
        assert await client.publish_topic("orders.eu.created", b"o4") == {"eu-orders": 3}
        with pytest.raises(replika.NotFound):
            await client.unbind("created", "x")


async def test_topic_publish_needs_publish_on_every_queue_it_reaches(tmp_path: Path, auth_file: Path) -> None:
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ADMIN) as admin,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
    ):
        await admin.bind("orders.eu", "order.*")
        assert await orders.publish_topic("order.new", b"1") == {"orders.eu": 1}
        with pytest.raises(replika.Forbidden):
            await orders.bind("orders.eu", "x")
        await admin.bind("billing", "order.#")
        with pytest.raises(replika.Forbidden):
            await orders.publish_topic("order.new", b"2")  # billing is not its to publish to: nothing stored
        assert (await admin.stats("orders.eu"))["total"] == 1
        assert await admin.publish_topic("order.new", b"3") == {"billing": 1, "orders.eu": 2}
        with pytest.raises(replika.Forbidden):
            await orders.unbind("billing", "order.#")


# ---------------------------------------------------------------------------------------------------- 8. queues
async def test_declare_changes_options_and_is_idempotent(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("opts", max_attempts=2, message_ttl=60, overflow="dead_letter", max_length=5)
        await client.publish("opts", b"kept")
        await client.declare("opts", max_attempts=2, message_ttl=60, overflow="dead_letter", max_length=5)
        stats = await client.stats("opts")
        assert (stats["max_attempts"], stats["message_ttl"], stats["overflow"], stats["total"]) == (
            2,
            60,
            "dead_letter",
            1,
        )
        await client.declare("opts", retry_delay=5)
        stats = await client.stats("opts")
        assert (stats["max_attempts"], stats["message_ttl"], stats["retry_delay"], stats["total"]) == (None, None, 5, 1)


async def test_deleting_a_queue_with_messages_in_flight(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("gone", [b"1", b"2"], priority=3)
        await client.publish("gone", b"3", ttl=60)
        msgs = await client.fetch("gone", max=3)
        await client.delete_queue("gone")
        with pytest.raises(replika.NotFound):
            await client.ack(msgs, wait=True)
        with pytest.raises(replika.NotFound):
            await msgs[0].nack(wait=True)
        await client.publish("gone", b"new")  # a new queue: the old tokens are not its
        with pytest.raises(replika.StaleLease):
            await client.ack(msgs, wait=True)
        [fresh] = await client.fetch("gone")
        assert (fresh.id, fresh.payload) == (1, b"new")


async def test_purge_keeps_later_acks_of_leased_messages_harmless(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("pg", [b"1", b"2", b"3"], priority=1)
        await client.publish("pg", b"4", delay=60)
        leased, nacked = await client.fetch("pg", max=2)
        await nacked.nack()
        assert await client.purge("pg") == 3
        await leased.ack()  # still current
        with pytest.raises(replika.StaleLease):
            await nacked.ack(wait=True)  # settled, then purged
        stats = await client.stats("pg")
        assert (stats["total"], stats["ready"], stats["delayed"]) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------- validation
NEW_FIELD_ERRORS: list[tuple[str, Frame]] = [
    ("publish-priority-10", {"op": "publish", "queue": "q", "payloads": [b"x"], "priority": 10}),
    ("publish-priority-negative", {"op": "publish", "queue": "q", "payloads": [b"x"], "priority": -1}),
    ("publish-priority-float", {"op": "publish", "queue": "q", "payloads": [b"x"], "priority": 1.0}),
    ("publish-priority-bool", {"op": "publish", "queue": "q", "payloads": [b"x"], "priority": True}),
    ("publish-delay-negative", {"op": "publish", "queue": "q", "payloads": [b"x"], "delay": -1}),
    ("publish-delay-too-long", {"op": "publish", "queue": "q", "payloads": [b"x"], "delay": 30 * 86400 + 1}),
    ("publish-delay-str", {"op": "publish", "queue": "q", "payloads": [b"x"], "delay": "1"}),
    ("publish-ttl-0", {"op": "publish", "queue": "q", "payloads": [b"x"], "ttl": 0}),
    ("publish-ttl-inf", {"op": "publish", "queue": "q", "payloads": [b"x"], "ttl": float("inf")}),
    ("publish-ttl-too-long", {"op": "publish", "queue": "q", "payloads": [b"x"], "ttl": 3650 * 86400 + 1}),
    ("publish-dedup-not-array", {"op": "publish", "queue": "q", "payloads": [b"x"], "dedup_ids": "d"}),
    ("publish-dedup-short", {"op": "publish", "queue": "q", "payloads": [b"x", b"y"], "dedup_ids": ["d"]}),
    ("publish-dedup-int", {"op": "publish", "queue": "q", "payloads": [b"x"], "dedup_ids": [1]}),
    ("publish-dedup-empty", {"op": "publish", "queue": "q", "payloads": [b"x"], "dedup_ids": [""]}),
    ("publish-dedup-long", {"op": "publish", "queue": "q", "payloads": [b"x"], "dedup_ids": ["é" * 128]}),
    ("nack-delay-negative", {"op": "nack", "queue": "q", "leases": [[1, 1]], "delay": -0.5}),
    ("declare-overflow-bad", {"op": "declare", "queue": "q", "overflow": "drop_newest"}),
    ("declare-overflow-int", {"op": "declare", "queue": "q", "overflow": 1}),
    ("declare-expired-bad", {"op": "declare", "queue": "q", "expired": "reject"}),
    ("declare-retry-delay-negative", {"op": "declare", "queue": "q", "retry_delay": -1}),
    ("declare-retry-backoff-below-1", {"op": "declare", "queue": "q", "retry_backoff": 0.5}),
    ("declare-retry-backoff-too-big", {"op": "declare", "queue": "q", "retry_backoff": 101}),
    ("declare-retry-max-delay-str", {"op": "declare", "queue": "q", "retry_max_delay": "60"}),
    ("declare-message-ttl-0", {"op": "declare", "queue": "q", "message_ttl": 0}),
    ("declare-message-ttl-nan", {"op": "declare", "queue": "q", "message_ttl": float("nan")}),
    ("declare-dedup-window-negative", {"op": "declare", "queue": "q", "dedup_window": -1}),
    ("declare-dedup-window-too-long", {"op": "declare", "queue": "q", "dedup_window": 7 * 86400 + 1}),
    ("topic-missing", {"op": "publish_topic", "payloads": [b"x"]}),
    ("topic-wildcard", {"op": "publish_topic", "topic": "a.*", "payloads": [b"x"]}),
    ("topic-space", {"op": "publish_topic", "topic": "a b", "payloads": [b"x"]}),
    ("topic-no-payloads", {"op": "publish_topic", "topic": "a.b"}),
    ("topic-priority-bad", {"op": "publish_topic", "topic": "a", "payloads": [b"x"], "priority": 11}),
    ("bind-no-pattern", {"op": "bind", "queue": "q"}),
    ("bind-pattern-partial-wildcard", {"op": "bind", "queue": "q", "pattern": "a.b*"}),
    ("bind-pattern-empty", {"op": "bind", "queue": "q", "pattern": ""}),
    ("bind-pattern-int", {"op": "bind", "queue": "q", "pattern": 3}),
    ("bind-bad-queue", {"op": "bind", "queue": "a/b", "pattern": "a"}),
    ("unbind-pattern-bad", {"op": "unbind", "queue": "q", "pattern": "#x"}),
]


@pytest.mark.parametrize("frame", [f for _, f in NEW_FIELD_ERRORS], ids=[name for name, _ in NEW_FIELD_ERRORS])
async def test_invalid_new_fields_are_bad_requests_and_change_nothing(server: RunningServer, frame: Frame) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({**frame, "id": 9}, 9, ErrorCode.BAD_REQUEST)
    reply = await conn.request({"id": 10, "op": "queues"})
    assert reply["queues"] == []  # nothing was created
    await conn.close()


async def test_the_new_ops_on_the_wire(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    assert await conn.request({"id": 1, "op": "bind", "queue": "w", "pattern": "t.#"}) == {"id": 1, "ok": True}
    reply = await conn.request({"id": 2, "op": "publish_topic", "topic": "t.a", "payloads": [b"1", b"2"]})
    assert reply == {"ids": {"w": [1, 2]}, "id": 2, "ok": True}
    reply = await conn.request({"id": 3, "op": "publish", "queue": "w", "payloads": [b"3"], "dedup_ids": ["d"]})
    assert reply == {"first_id": 3, "count": 1, "ids": [3], "id": 3, "ok": True}
    reply = await conn.request(
        {"id": 4, "op": "publish", "queue": "w", "payloads": [b"3", b"4"], "dedup_ids": ["d", None]}
    )
    assert reply == {"first_id": 4, "count": 1, "ids": [3, 4], "id": 4, "ok": True}
    reply = await conn.request(
        {"id": 5, "op": "publish", "queue": "w", "payloads": [b"5"], "priority": 9, "delay": 0, "ttl": 60}
    )
    assert reply == {"first_id": 5, "count": 1, "id": 5, "ok": True}
    reply = await conn.request({"id": 6, "op": "fetch", "queue": "w", "max": 1})
    assert reply["msgs"][0][4] == b"5"
    reply = await conn.request({"id": 7, "op": "unbind", "queue": "w", "pattern": "t.#"})
    assert reply == {"id": 7, "ok": True}
    reply = await conn.request({"id": 8, "op": "stats", "queue": "w"})
    assert reply["stats"]["bindings"] == [] and reply["stats"]["total"] == 5
    await conn.close()


# ---------------------------------------------------------------------------------------------------- fuzz
_NEW_OPS = ["publish", "publish_topic", "bind", "unbind", "peek", "redrive", "declare", "nack"]
_NEW_FIELDS = [
    "queue",
    "topic",
    "pattern",
    "to",
    "max",
    "payloads",
    "headers",
    "priority",
    "delay",
    "ttl",
    "dedup_ids",
    "overflow",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "message_ttl",
    "expired",
    "dedup_window",
    "leases",
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=8)
    | st.text(max_size=8)
    | st.sampled_from(["q", "a.*", "#", "a.#.b", "drop", "reject", "drop_oldest", "dead_letter", "", "x" * 256])
)
_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=2)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_NEW_OPS), st.dictionaries(st.sampled_from(_NEW_FIELDS), _values))
def test_new_fields_only_ever_refuse_with_a_request_error(op: str, fields: dict[str, Any]) -> None:
    limits = Limits(max_batch=16, max_payload=1024, max_reply_bytes=64 * 1024)
    try:
        parse_op(op, {"op": op, "id": 1, **fields}, 1, limits)
    except RequestError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.BATCH_TOO_LARGE, ErrorCode.PAYLOAD_TOO_LARGE), exc
