"""Edge cases found in review: reply size, settled tokens, half-close, long names, a full store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

import replika
from replika_protocol import FrameDecoder, encode_frame
from replika_protocol.framing import PASS_THROUGH
from tests.conftest import WAIT, RunningServer, serving


async def test_fetch_reply_never_exceeds_the_frame_limit(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "d", max_frame=64 * 1024, max_payload=40 * 1024) as srv,
        replika.AsyncClient(srv.url) as client,
    ):
        await client.publish_many("big", [bytes([i]) * 40 * 1024 for i in range(3)])
        first = await client.fetch("big", max=10)
        assert len(first) == 1  # two would not fit in one 64 KiB reply
        rest = await client.fetch("big", max=10)
        rest += await client.fetch("big", max=10)
        assert [m.payload[0] for m in first + rest] == [0, 1, 2]
        assert all(m.attempts == 1 for m in first + rest)


async def test_a_nacked_delivery_can_no_longer_be_acked_or_touched(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("n", b"x")
        [msg] = await client.fetch("n")
        await msg.nack()
        with pytest.raises(replika.StaleLease):
            await msg.ack(wait=True)  # waiting: its own error is raised here
        with pytest.raises(replika.StaleLease):
            await msg.touch(wait=True)
        [again] = await client.fetch("n")
        assert again.attempts == 2
        await again.ack()


async def test_half_closed_client_still_gets_its_replies(server: RunningServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(encode_frame({"op": "hello", "id": 1, "versions": [1]}))
    writer.write(encode_frame({"op": "publish", "id": 2, "queue": "eof", "payloads": [b"a"]}))
    writer.write_eof()
    decoder = FrameDecoder()
    replies = []
    while True:
        data = await asyncio.wait_for(reader.read(65536), WAIT)
        if not data:
            break
        replies += decoder.feed(data)
    writer.close()
    assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, True)]
    assert replies[1]["first_id"] == 1


async def test_longest_queue_name_has_an_addressable_dead_letter_queue(server: RunningServer) -> None:
    name = "q" * 255
    async with replika.AsyncClient(server.url) as client:
        await client.publish(name, b"x")
        [msg] = await client.fetch(name)
        await msg.reject()
        dlq = "q" * 251 + ".dlq"
        assert (await client.stats(name))["dead_letter"] == dlq
        [dead] = await client.fetch(dlq)
        assert dead.headers["replika-dead-letter-queue"] == name


async def test_a_full_store_refuses_publishes_keeps_serving_and_recovers(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "d", max_store_size=2 * 1024**2) as srv,
        replika.AsyncClient(srv.url) as client,
    ):
        stored = 0
        with pytest.raises(replika.StoreFull):
            for _ in range(200):  # 200 x 64 KiB = 12.5 MiB: far past the 2 MiB limit
                await client.publish_many("fill", [b"x" * 16384] * 4)
                stored += 4
        assert stored > 0
        assert (await client.stats("fill"))["total"] == stored  # nothing half-written
        with pytest.raises(replika.StoreFull):
            await client.publish("fill", b"still full")
        drained = 0
        while drained < stored:
            msgs = await client.fetch("fill", max=50)
            await client.ack(msgs)
            drained += len(msgs)
        assert (await client.stats("fill"))["total"] == 0
        assert await client.publish("fill", b"room again") > 0  # recovered by itself


async def test_token_zero_never_settles_a_nacked_message(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("z", b"x")
        [msg] = await client.fetch("z")
        await msg.nack(delay=WAIT)
        msg.token = 0  # what a nack stores: it must match nothing
        with pytest.raises(replika.StaleLease):
            await msg.ack(wait=True)
        assert (await client.stats("z"))["delayed"] == 1


async def test_headers_are_limited(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        with pytest.raises(replika.BadRequest, match="headers"):
            await client.publish("h", b"x", headers={"k": "v" * 17 * 1024})
        await client.publish("h", b"x", headers={"k": "v" * 15 * 1024})


async def test_unseen_must_be_a_boolean(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("u", b"x")
        [msg] = await client.fetch("u")
        with pytest.raises(replika.BadRequest, match="unseen"):
            await client._settle("nack", [msg], True, {"delay": 0.0, "unseen": "yes"})
        await msg.ack()


@pytest.mark.parametrize(
    "fields",
    [
        {"ids": [1, 2], "tokens": [1]},
        {"ids": [], "tokens": []},
        {"ids": [1], "tokens": ["1"]},
        {"ids": [True], "tokens": [1]},
        {"ids": [-1], "tokens": [1]},
        {"ids": 1, "tokens": [1]},
        {"ids": [1]},
        {},
    ],
)
async def test_the_compact_settle_form_is_validated(server: RunningServer, fields: dict[str, object]) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish("v", b"x")
        with pytest.raises(replika.BadRequest):
            await client._call("ack", queue="v", **fields)
        assert (await client.stats("v"))["total"] == 1


async def test_both_settle_forms_ack(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("forms", [b"1", b"2"])
        first, second = await client.fetch("forms", max=2)
        assert (await client._call("ack", queue="forms", leases=[[first.id, first.token]]))["failed"] == {}
        reply = await client._call("ack", queue="forms", ids=[second.id, first.id], tokens=[second.token, 7])
        assert reply["failed"] == {first.id: "STALE_LEASE"}
        assert (await client.stats("forms"))["total"] == 0


async def test_big_payloads_come_back_whole_through_every_front_end(tmp_path: Path) -> None:
    # Payloads of PASS_THROUGH bytes and more leave the store as views and the binary protocol's reply without
    # being copied into its encoding; the text protocol and the HTTP API get the same deliveries.
    sizes = [PASS_THROUGH - 1, PASS_THROUGH, 300_000]
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    async with serving(tmp_path / "d", admin_port=0) as srv, replika.AsyncClient(srv.url) as client:
        await client.publish_many("big", payloads)
        await client.publish("big", payloads[2], headers={"h": "v"})
        got = await client.fetch("big", max=10)
        assert [m.payload for m in got] == [*payloads, payloads[2]]
        assert got[3].headers == {"h": "v"}
        await client.nack(got[1:])  # redelivered through the general fetch path
        again = await client.fetch("big", max=10)
        assert [m.payload for m in again] == [*payloads[1:], payloads[2]]
        await client.nack(again)

        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
        writer.write(b"FETCH big 1\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"OK 1\r\n"
        handle = (await asyncio.wait_for(reader.readline(), WAIT)).split()[1]  # MSG id:token attempts=.. bytes=..
        assert await asyncio.wait_for(reader.readexactly(PASS_THROUGH + 2), WAIT) == payloads[1] + b"\r\n"
        writer.write(b"ACK big " + handle + b"\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"OK\r\n"
        writer.close()

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.server.admin_port}", timeout=WAIT) as h:
            reply = await h.post("/api/queues/big/fetch", params={"max": 1})
            [msg] = reply.json()["messages"]
            assert msg["encoding"] == "utf-8" and msg["payload"].encode() == payloads[2]
