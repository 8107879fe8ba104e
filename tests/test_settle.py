"""Settles not waited for (SPEC.md §5), through both clients against real brokers: coalesced, durable by
flush() and close(), and every failure raised once, by the next call, flush() or close()."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

import replika
from replika_protocol import Frame, FrameDecoder, encode_frame
from tests.conftest import WAIT, RunningServer, ServerProcess
from tests.test_delivery import wait_until_ready


async def stale_delivery(client: replika.AsyncClient, queue: str) -> tuple[replika.Message, replika.Message]:
    """A message delivered twice: the first delivery's token is no longer current."""
    await client.publish(queue, b"job")
    [first] = await client.fetch(queue, lease=0.05)
    [second] = await client.fetch(queue, wait=WAIT)  # once the first lease expired
    assert second.id == first.id and second.token != first.token
    return first, second


async def test_the_acks_of_one_loop_turn_are_one_request_and_durable_after_flush(server: RunningServer) -> None:
    broker = server.server.broker
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("turn", [str(i).encode() for i in range(50)])
        msgs = await client.fetch("turn", max=50)
        ops = broker.batched_ops
        for msg in msgs:
            await msg.ack()  # returns at once: nothing is sent before this loop turn ends
        await client.flush()
        assert broker.batched_ops == ops + 1  # fifty acks, one request
        assert (await client.stats("turn"))["total"] == 0


async def test_closing_flushes(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("closing", [b"1", b"2", b"3"])
        msgs = await client.fetch("closing", max=3)
        await client.ack(msgs[:2])
        await msgs[2].nack(delay=WAIT)
    async with replika.AsyncClient(server.url) as other:  # what the first one settled is settled
        stats = await other.stats("closing")
        assert (stats["total"], stats["in_flight"], stats["delayed"]) == (1, 0, 1)


async def test_a_failed_ack_not_waited_for_is_raised_by_flush_once(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first, second = await stale_delivery(client, "f")
        await first.ack()  # returns: its failure comes later
        with pytest.raises(replika.StaleLease) as info:
            await client.flush()
        assert info.value.failed == {first.id: "STALE_LEASE"} and "no longer current" in str(info.value)
        await client.flush()  # raised once
        await second.ack(wait=True)


async def test_the_next_call_raises_it_before_doing_anything(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first, second = await stale_delivery(client, "n")
        await first.ack()
        await client.stats("n")  # sent after the ack, so answered after it: the failure is known now
        with pytest.raises(replika.StaleLease):
            await client.publish("n", b"never")
        assert (await client.stats("n"))["total"] == 1  # the publish that raised did not happen
        await second.ack(wait=True)


async def test_a_settle_call_queues_its_own_settle_before_raising(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first, second = await stale_delivery(client, "s")
        await client.publish("s", b"other")
        [other] = await client.fetch("s")
        await first.ack()
        await client.stats("s")
        with pytest.raises(replika.StaleLease) as info:
            await other.ack()
        assert info.value.failed == {first.id: "STALE_LEASE"}  # the earlier ack's failure, not this one's
        await client.flush()
        stats = await client.stats("s")
        assert (stats["total"], stats["in_flight"]) == (1, 1)  # 'other' was acked; 'second' is still leased
        await second.ack(wait=True)


async def test_consume_goes_on_and_the_loops_next_ack_raises(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first, _second = await stale_delivery(client, "c")
        await client.publish_many("c", [b"a", b"b"])
        consumer = client.consume("c", prefetch=10)
        a = await anext(consumer)
        await first.ack()
        await client.stats("c")
        b = await asyncio.wait_for(anext(consumer), WAIT)  # the iteration does not raise it
        assert [a.payload, b.payload] == [b"a", b"b"]
        with pytest.raises(replika.StaleLease):
            await a.ack()  # the loop's next settle call: a's own ack is queued first
        await b.ack()
        await consumer.aclose()
        await client.flush()
        assert (await client.stats("c"))["total"] == 1  # a and b acked; the twice-delivered one is leased


async def test_close_raises_what_no_call_raised_and_a_with_block_keeps_its_own_error(server: RunningServer) -> None:
    client = replika.AsyncClient(server.url)
    first, second = await stale_delivery(client, "x")
    await first.ack()
    with pytest.raises(replika.StaleLease):
        await client.close()
    with pytest.raises(ValueError) as info:
        async with replika.AsyncClient(server.url) as again:
            [third] = await again.fetch("x", wait=WAIT)  # 'second' went back with the closed connection
            await again.ack(second)  # so its token is no longer current either
            raise ValueError("the body's own error")
    assert any("StaleLease" in note for note in getattr(info.value, "__notes__", []))
    assert third.id == second.id
    async with replika.AsyncClient(server.url) as last:
        await wait_until_ready(last, "x", 1)


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Queue[Frame]]]:
    """A server that does the handshake, answers nothing after it (each request it receives goes into the
    queue yielded), and drops the connection when told."""
    drop = asyncio.Event()
    received: asyncio.Queue[Frame] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while not (frames := decoder.feed(await reader.read(65536))):
            pass
        writer.write(encode_frame({"id": frames[0]["id"], "ok": True, "max_batch": 1000}))
        for frame in frames[1:]:
            received.put_nowait(frame)

        async def read() -> None:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    received.put_nowait(frame)

        reading = asyncio.ensure_future(read())
        await drop.wait()
        reading.cancel()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], drop, received
    finally:
        listener.close()
        await listener.wait_closed()


async def test_settles_unanswered_when_the_connection_drops_are_reported_by_flush() -> None:
    async with silent_broker() as (port, drop, _):
        client = replika.AsyncClient(f"replika://127.0.0.1:{port}")
        await client.connect()
        msg = replika.Message("q", [1, 1, 1, 0.0, b"", None], client)
        await msg.ack()
        flushing = asyncio.ensure_future(client.flush())  # waits for a reply that never comes ...
        drop.set()  # ... until the connection drops (sent or not yet, the ack is unconfirmed either way)
        with pytest.raises(replika.ConnectionLost, match="1 settle"):
            await asyncio.wait_for(flushing, WAIT)
        await client.close()  # already raised: nothing more


async def test_every_task_waiting_on_settles_lost_with_the_connection_raises() -> None:
    # Two tasks sharing a client each wait for their own ack: both must learn it may not have been applied
    # (one ConnectionLost raised to the first of them and the second returning would count its ack as done).
    async with silent_broker() as (port, drop, received):
        client = replika.AsyncClient(f"replika://127.0.0.1:{port}")
        await client.connect()
        acks = [replika.Message("q", [i, i, 1, 0.0, b"", None], client) for i in (1, 2)]
        waiting = [asyncio.ensure_future(msg.ack(wait=True)) for msg in acks]
        sent = [await asyncio.wait_for(received.get(), WAIT) for _ in acks]  # two requests: one per barrier
        assert [f["ids"] for f in sent] == [[1], [2]] and not any(w.done() for w in waiting)
        drop.set()
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), WAIT)
        assert [type(r) for r in results] == [replika.ConnectionLost, replika.ConnectionLost]
        await client.close()  # both raised, and no settle no one waited for was lost: nothing more


@contextlib.asynccontextmanager
async def scripted_broker(
    replies: list[list[dict[str, object]]],
) -> AsyncIterator[int]:
    """A server that does the handshake and then answers requests in writes of its own choosing: for each entry
    of ``replies``, it waits for as many requests as the entry has replies and writes them, in one write, with
    those requests' ids (in arrival order)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        frames: list[Frame] = []
        while not frames:
            frames = decoder.feed(await reader.read(65536))
        writer.write(encode_frame({"id": frames.pop(0)["id"], "ok": True, "max_batch": 1000}))
        for group in replies:
            while len(frames) < len(group):
                frames += decoder.feed(await reader.read(65536))
            taken, frames = frames[: len(group)], frames[len(group) :]
            writer.write(b"".join(encode_frame({"id": f["id"], **r}) for f, r in zip(taken, group, strict=True)))
        await reader.read()  # until the client closes

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()


async def test_a_failed_settle_is_raised_to_its_waiter_even_if_another_tasks_call_runs_first() -> None:
    # Found by the I/O-error fault test: two consumers on one client, each waiting on its own ack. Both replies
    # come in one read; the first consumer, whose ack applied, goes on with its next call, which raises errors
    # of settles no one waits for; it took the second consumer's failure, and the second returned as if its ack
    # had applied: a "confirmed" ack of messages that came back after the broker restarted.
    failed = {"ok": False, "code": "STORE_FAILED", "message": "the store failed"}
    async with scripted_broker([[{"ok": True}, failed], [{"ok": True}]]) as port:
        client = replika.AsyncClient(f"replika://127.0.0.1:{port}")
        await client.connect()
        first, second = (replika.Message("q", [i, i, 1, 0.0, b"", None], client) for i in (1, 2))

        async def first_consumer() -> None:
            await first.ack(wait=True)  # applied
            await client.ping()  # the next call: must not raise the other consumer's failure

        results = await asyncio.wait_for(
            asyncio.gather(first_consumer(), second.ack(wait=True), return_exceptions=True), WAIT
        )
        assert results[0] is None, results
        assert isinstance(results[1], replika.StoreFailed), results
        await client.close()  # every error raised once, to its own caller: nothing more


async def test_a_task_waiting_on_its_settle_raises_its_own_refusal_and_not_anothers(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        first, second = await stale_delivery(client, "own")
        good, stale = second, first
        results = await asyncio.wait_for(
            asyncio.gather(good.ack(wait=True), stale.ack(wait=True), return_exceptions=True), WAIT
        )
        assert results[0] is None
        assert isinstance(results[1], replika.StaleLease) and results[1].failed == {stale.id: "STALE_LEASE"}
        await client.flush()  # raised once, to its own caller


# ----------------------------------------------------------------------------------------------- blocking client
def test_blocking_settles_are_sent_at_once_and_their_failures_raised_later(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.publish_many("b", [b"1", b"2"])
        first, other = client.fetch("b", max=2)
        first.nack()
        first.ack()  # stale: the nack ended that delivery
        assert client.stats("b")["total"] == 2  # the nack was applied before the stats ran
        with pytest.raises(replika.StaleLease) as info:
            other.ack()  # the next call raises the earlier failure, its own ack sent first
        assert info.value.failed == {first.id: "STALE_LEASE"}
        client.flush()
        assert client.stats("b")["total"] == 1


def test_blocking_consume_loop_and_close_flush(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.publish_many("bc", [str(i).encode() for i in range(300)])
        seen = []
        for msg in client.consume("bc", prefetch=64):
            seen.append(int(msg.payload))
            msg.ack()
            if len(seen) == 300:
                break
        assert seen == list(range(300))
    with replika.Client(server_process.url) as other:
        stats = other.stats("bc")
        assert (stats["total"], stats["in_flight"]) == (0, 0)


def test_blocking_close_raises_a_failure_no_call_raised(server_process: ServerProcess) -> None:
    client = replika.Client(server_process.url)
    client.publish("bx", b"x")
    [msg] = client.fetch("bx")
    msg.reject()
    msg.touch()  # stale: rejected
    with pytest.raises(replika.StaleLease):
        client.close()
    assert not client.connected
