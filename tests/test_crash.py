"""A confirmed publish survives kill -9 of the broker: the crash test of DESIGN.md's durability promise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import replika
from tests.conftest import WAIT, ServerProcess


async def test_kill_9_during_confirmed_publishes_loses_none(server_process: ServerProcess) -> None:
    confirmed: list[bytes] = []
    enough = asyncio.Event()

    async def producer(client: replika.AsyncClient, n: int) -> None:
        i = 0
        while True:
            payload = f"{n}:{i}".encode()
            batch = [payload + b"/" + str(j).encode() for j in range(1 + i % 7)]
            try:
                if len(batch) == 1:
                    await client.publish("crash", batch[0])
                else:
                    await client.publish_many("crash", batch)
            except replika.ConnectionLost:
                return  # in flight when the server died: not confirmed, so nothing is promised
            confirmed.extend(batch)
            if len(confirmed) >= 3000:
                enough.set()
            i += 1

    clients = [replika.AsyncClient(server_process.url) for _ in range(4)]
    for c in clients:
        await c.connect()
    tasks = [asyncio.ensure_future(producer(clients[n % 4], n)) for n in range(16)]
    await asyncio.wait_for(enough.wait(), WAIT * 4)
    server_process.kill()  # SIGKILL while publishes are still in flight
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    for c in clients:
        await c.close()
    assert len(confirmed) >= 3000

    server_process.start()
    stored: set[bytes] = set()
    async with replika.AsyncClient(server_process.url) as client:
        while True:
            msgs = await client.fetch("crash", max=5000)
            if not msgs:
                break
            stored.update(m.payload for m in msgs)
            await client.ack(msgs)
    missing = [p for p in confirmed if p not in stored]
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {missing[:5]}"


async def test_kill_9_keeps_unacked_and_redelivers_leased(server_process: ServerProcess) -> None:
    async with replika.AsyncClient(server_process.url) as client:
        await client.publish_many("jobs", [b"a", b"b", b"c"])
        [leased] = await client.fetch("jobs")
        assert leased.payload == b"a"
        [done] = await client.fetch("jobs")
        await done.ack(wait=True)  # durable before the kill: an ack not waited for might not be yet
        server_process.kill()
    server_process.start()
    async with replika.AsyncClient(server_process.url) as client:
        msgs = await client.fetch("jobs", max=10)
        assert [(m.payload, m.attempts) for m in msgs] == [(b"a", 2), (b"c", 1)]


async def test_relaxed_durability_survives_a_process_crash(tmp_path: Path) -> None:
    # relaxed: confirmed once written to the OS, fsynced every --sync-interval; a kill -9 of the broker (not of
    # the machine) loses nothing confirmed (SPEC.md, durability).
    proc = ServerProcess(tmp_path / "data", "--durability", "relaxed", "--sync-interval", "60").start()
    try:
        async with replika.AsyncClient(proc.url) as client:
            ids = await client.publish_many("relaxed", [str(i).encode() for i in range(500)])
            assert len(ids) == 500
        proc.kill()
        proc.start()
        async with replika.AsyncClient(proc.url) as client:
            msgs = await client.fetch("relaxed", max=1000)
            assert [m.payload for m in msgs] == [str(i).encode() for i in range(500)]
    finally:
        proc.stop()
