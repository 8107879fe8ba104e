"""Delivery semantics through the real SDK against a real server: FIFO, leases, redelivery, dead-lettering."""

from __future__ import annotations

import asyncio
import time

import pytest

import replika
from tests.conftest import WAIT, RunningServer, restart


async def wait_until_ready(client: replika.AsyncClient, queue: str, ready: int) -> dict[str, object]:
    """Poll stats until ``ready`` messages are ready (leases end on the server's timer, not on our call)."""
    deadline = time.monotonic() + WAIT
    while True:
        stats = await client.stats(queue)
        if stats["ready"] == ready:
            return stats
        assert time.monotonic() < deadline, f"queue {queue} never reached ready={ready}: {stats}"
        await asyncio.sleep(0.02)


async def test_ten_thousand_messages_round_trip_fifo(server: RunningServer) -> None:
    payloads = [f"message-{i}".encode() for i in range(10_000)]
    async with replika.AsyncClient(server.url) as client:
        ids = await client.publish_many("fifo", payloads)
        assert ids == sorted(ids) and len(set(ids)) == 10_000
        received: list[bytes] = []
        while len(received) < len(payloads):
            msgs = await client.fetch("fifo", max=700, wait=WAIT)
            received.extend(m.payload for m in msgs)
            await client.ack(msgs)
        assert received == payloads
        stats = await client.stats("fifo")
        assert (stats["ready"], stats["in_flight"], stats["total"]) == (0, 0, 0)


async def test_concurrent_publishers_share_commits_and_keep_order_per_publisher(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:

        async def produce(n: int) -> list[int]:
            return [await client.publish("shared", f"{n}:{i}".encode()) for i in range(50)]

        id_lists = await asyncio.gather(*(produce(n) for n in range(20)))
        for ids in id_lists:
            assert ids == sorted(ids)
        msgs = await client.fetch("shared", max=5000)
        assert len(msgs) == 1000
        for n in range(20):
            mine = [m.payload for m in msgs if m.payload.startswith(f"{n}:".encode())]
            assert mine == [f"{n}:{i}".encode() for i in range(50)]
    # More requests than batches: publishes from concurrent callers were grouped into shared commits.
    assert server.server.broker.batches < server.server.broker.batched_ops


async def test_headers_and_message_fields(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        before = time.time()
        mid = await client.publish("h", b"\x00\xffbinary", headers={"trace": "abc", "kind": "demo"})
        [msg] = await client.fetch("h")
        assert msg.id == mid and msg.queue == "h" and msg.attempts == 1
        assert msg.payload == b"\x00\xffbinary"
        assert msg.headers == {"trace": "abc", "kind": "demo"}
        assert before - 1 <= msg.published_at <= time.time() + 1


async def test_long_poll_fetch_is_woken_by_a_publish(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as consumer, replika.AsyncClient(server.url) as producer:
        waiting = asyncio.ensure_future(consumer.fetch("lp", wait=WAIT))
        # The fetch is parked once the queue has a consumer; publish only then, so the wake-up path is used.
        deadline = time.monotonic() + WAIT
        while server.server.broker.consumers("lp") == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await producer.publish("lp", b"wake")
        msgs = await asyncio.wait_for(waiting, WAIT)
        assert [m.payload for m in msgs] == [b"wake"]


async def test_long_poll_times_out_empty(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        assert await client.fetch("empty", wait=0.05) == []
        assert await client.fetch("empty") == []


async def test_lease_expiry_redelivers_and_old_token_is_stale(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("exp", b"job")
        [first] = await client.fetch("exp", lease=0.05)
        [second] = await client.fetch("exp", wait=WAIT)  # ready again once the lease expires
        assert second.id == first.id and second.attempts == 2 and second.token != first.token
        with pytest.raises(replika.StaleLease) as info:
            await first.ack(wait=True)
        assert info.value.code == "STALE_LEASE" and info.value.failed == {first.id: "STALE_LEASE"}
        assert info.value.reasons == {first.id: "redelivered"} and "redelivered" in str(info.value)
        await second.ack()
        assert (await client.stats("exp"))["total"] == 0


async def test_expired_but_not_redelivered_lease_still_acks(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("late", b"slow work")
        [msg] = await client.fetch("late", lease=0.05)
        await wait_until_ready(client, "late", 1)  # expired, back in the queue, not delivered again
        await msg.ack()  # the work was done: the ack counts
        assert (await client.stats("late"))["total"] == 0


async def test_touch_extends_a_lease(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("touch", b"long job")
        [msg] = await client.fetch("touch", lease=0.5)
        await msg.touch(lease=WAIT)
        # Once the original deadline has passed and the timer has run, the message must still be in flight.
        await asyncio.sleep(0.6)  # wall time has to pass the old deadline; nothing to await instead
        stats = await client.stats("touch")
        assert (stats["ready"], stats["in_flight"]) == (0, 1)
        await msg.ack()


async def test_disconnect_makes_leased_messages_ready_again(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("dc", [b"a", b"b"])
        async with replika.AsyncClient(server.url) as doomed:
            msgs = await doomed.fetch("dc", max=2, lease=WAIT)
            assert len(msgs) == 2
        await wait_until_ready(client, "dc", 2)
        again = await client.fetch("dc", max=2)
        assert [(m.payload, m.attempts) for m in again] == [(b"a", 2), (b"b", 2)]


async def test_nack_requeues_now_or_after_a_delay(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("nack", [b"now", b"later"])
        now, later = await client.fetch("nack", max=2)
        await later.nack(delay=0.3)
        await now.nack()
        stats = await client.stats("nack")
        assert (stats["ready"], stats["delayed"], stats["in_flight"]) == (1, 1, 0)
        [again] = await client.fetch("nack")
        assert again.payload == b"now" and again.attempts == 2
        started = time.monotonic()
        [delayed] = await client.fetch("nack", wait=WAIT)
        assert delayed.payload == b"later" and delayed.attempts == 2
        assert time.monotonic() - started > 0.1  # it was held back, whatever the machine's speed


async def test_reject_dead_letters_with_headers(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("orders", b"poison", headers={"k": "v"})
        [msg] = await client.fetch("orders")
        await msg.reject()
        assert (await client.stats("orders"))["total"] == 0
        [dead] = await client.fetch("orders.dlq")
        assert dead.payload == b"poison"
        assert dead.headers == {
            "k": "v",
            "replika-dead-letter-queue": "orders",
            "replika-dead-letter-reason": "rejected",
            "replika-dead-letter-id": str(msg.id),
            "replika-dead-letter-attempts": "1",
        }


async def test_max_attempts_dead_letters_to_a_named_queue(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("work", max_attempts=2, dead_letter="graveyard")
        await client.publish("work", b"fails twice")
        for attempt in (1, 2):
            [msg] = await client.fetch("work")
            assert msg.attempts == attempt
            await msg.nack()
        assert await client.fetch("work") == []
        [dead] = await client.fetch("graveyard")
        assert dead.headers["replika-dead-letter-reason"] == "max_attempts"
        assert dead.headers["replika-dead-letter-attempts"] == "2"
        stats = await client.stats("work")
        assert stats["max_attempts"] == 2 and stats["dead_letter"] == "graveyard"


async def test_max_attempts_also_applies_to_expired_leases(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("flaky", max_attempts=1)
        await client.publish("flaky", b"x")
        await client.fetch("flaky", lease=0.05)
        [dead] = await client.fetch("flaky.dlq", wait=WAIT)
        assert dead.headers["replika-dead-letter-reason"] == "max_attempts"


async def test_declare_is_idempotent_and_queues_lists_all(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("a", max_attempts=3)
        await client.declare("a", max_attempts=3)
        await client.publish("b", b"1")
        names = [q["queue"] for q in await client.queues()]
        assert names == ["a", "b"]


async def test_purge_keeps_leased_messages_and_their_acks(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("p", [b"1", b"2", b"3"])
        [leased] = await client.fetch("p")
        assert await client.purge("p") == 2
        stats = await client.stats("p")
        assert (stats["ready"], stats["in_flight"], stats["total"]) == (0, 1, 1)
        await leased.ack()
        await client.publish("p", b"4")
        [fresh] = await client.fetch("p")
        assert fresh.payload == b"4"


async def test_delete_queue_then_ack_is_not_found(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("gone", b"1")
        [msg] = await client.fetch("gone")
        await client.delete_queue("gone")
        with pytest.raises(replika.NotFound):
            await msg.ack(wait=True)
        with pytest.raises(replika.NotFound):
            await client.stats("gone")
        await client.publish("gone", b"again")  # a new queue of the same name starts empty
        assert (await client.stats("gone"))["total"] == 1


async def test_unacked_messages_survive_a_restart(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("durable", max_attempts=5)
        await client.publish_many("durable", [b"a", b"b", b"c"])
        [leased] = await client.fetch("durable")
        await client.ack(await client.fetch("durable"))  # b is done
        assert leased.payload == b"a"
        await client.close()
    await restart(server)
    async with replika.AsyncClient(server.url) as client:
        msgs = await client.fetch("durable", max=10)
        assert [(m.payload, m.attempts) for m in msgs] == [(b"a", 2), (b"c", 1)]
        assert (await client.stats("durable"))["max_attempts"] == 5
        new_id = await client.publish("durable", b"d")
        assert new_id > max(m.id for m in msgs)


async def test_consume_prefetches_and_acks(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("c", [str(i).encode() for i in range(250)])
        seen: list[bytes] = []
        async for msg in client.consume("c", prefetch=64):
            seen.append(msg.payload)
            await msg.ack()
            if len(seen) == 250:
                break
        assert seen == [str(i).encode() for i in range(250)]
        stats = await client.stats("c")
        assert (stats["total"], stats["in_flight"]) == (0, 0)


async def test_leaving_consume_hands_prefetched_messages_back(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("back", [b"1", b"2", b"3", b"4"])
        consumer = client.consume("back", prefetch=4)
        first = await anext(consumer)
        await first.ack()
        await consumer.aclose()
        stats = await wait_until_ready(client, "back", 3)
        assert stats["in_flight"] == 0


async def test_consume_reconnects_after_the_server_restarts(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as producer:
        await producer.publish("rc", b"before")
    client = replika.AsyncClient(server.url)
    consumer = client.consume("rc", prefetch=1)
    msg = await asyncio.wait_for(anext(consumer), WAIT)
    assert msg.payload == b"before"
    await msg.ack(wait=True)  # durable before the broker stops
    port = server.port
    await server.server.stop()
    from replika_server.config import Config
    from replika_server.node import Node as Server

    server.server = await Server.start(Config(host="127.0.0.1", port=port, data_dir=server.data_dir, admin_port=None))
    async with replika.AsyncClient(server.url) as producer:
        await producer.publish("rc", b"after")
    msg = await asyncio.wait_for(anext(consumer), WAIT)
    assert msg.payload == b"after"
    await msg.ack()
    await consumer.aclose()
    await client.close()


async def test_many_queues_do_not_mix(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        for q in ("q1", "q2", "q3"):
            await client.publish_many(q, [f"{q}-{i}".encode() for i in range(5)])
        for q in ("q2", "q1", "q3"):
            msgs = await client.fetch(q, max=10)
            assert [m.payload for m in msgs] == [f"{q}-{i}".encode() for i in range(5)]
            assert [m.id for m in msgs] == [1, 2, 3, 4, 5]


async def test_leaving_consume_hands_back_a_prefetch_that_already_landed(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("landed", [str(i).encode() for i in range(20)])
        consumer = client.consume("landed", prefetch=10, lease=4 * WAIT)  # only a hand-back frees them in time
        for _ in range(7):  # the refill fetch leaves after the 5th; the acks after it wait for its reply
            msg = await anext(consumer)
            await msg.ack()
        await consumer.aclose()
        stats = await wait_until_ready(client, "landed", 13)
        assert stats["in_flight"] == 0


async def test_messages_handed_back_by_consume_do_not_count_as_attempts(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.declare("once", max_attempts=1)
        await client.publish_many("once", [b"1", b"2", b"3"])
        consumer = client.consume("once", prefetch=3)
        first = await anext(consumer)
        await first.ack()
        await consumer.aclose()  # 2 and 3 were prefetched, never seen: handed back, not dead-lettered
        await wait_until_ready(client, "once", 2)
        rest = await client.fetch("once", max=10)
        assert [(m.payload, m.attempts) for m in rest] == [(b"2", 1), (b"3", 1)]
        assert "once.dlq" not in [q["queue"] for q in await client.queues()]
