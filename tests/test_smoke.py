import replika
from tests.conftest import RunningServer


async def test_publish_fetch_ack(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        mid = await client.publish("jobs", b"hello")
        [msg] = await client.fetch("jobs")
        assert (msg.id, msg.payload, msg.attempts) == (mid, b"hello", 1)
        await msg.ack()
        assert (await client.stats("jobs"))["total"] == 0


async def test_runs_on_uvloop() -> None:
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
