"""Several ``replika serve --store postgresql://...`` processes serving the same queues (issue 15): the real server
and SDK end to end, against the PostgreSQL cluster tests/pg.py starts. Each test gets a schema of its own."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import replika
from tests.conftest import WAIT, ServerProcess
from tests.engines import PostgresSpace
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture
def store_url(postgres_server: PostgresServer) -> Iterator[str]:
    space = PostgresSpace(postgres_server)
    try:
        yield space.new()
    finally:
        space.close()


def start_nodes(tmp_path: Path, url: str, n: int, *args: str) -> list[ServerProcess]:
    nodes: list[ServerProcess] = []
    for i in range(n):
        (tmp_path / f"node{i}").mkdir()
        nodes.append(ServerProcess(tmp_path / f"node{i}" / "data", "--store", url, *args).start())
    return nodes


@pytest.fixture
def nodes(tmp_path: Path, store_url: str) -> Iterator[list[ServerProcess]]:
    started = start_nodes(tmp_path, store_url, 3)
    try:
        yield started
    finally:
        for node in started:
            node.stop()


async def parked(node: ServerProcess, queue: str) -> None:
    """Until a long poll on ``queue`` is parked on ``node`` (its admin API counts them)."""
    deadline = time.monotonic() + WAIT
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.admin_port}", timeout=WAIT) as admin:
        while (await admin.get(f"/api/queues/{queue}")).json().get("consumers", 0) < 1:
            assert time.monotonic() < deadline, "the long poll never reached the node"
            await asyncio.sleep(0.02)  # another process's state: nothing to await but its answer


async def test_one_node_serves_publish_fetch_ack_and_history(store_url: str, tmp_path: Path) -> None:
    [node] = start_nodes(tmp_path, store_url, 1)
    try:
        async with replika.AsyncClient(node.url) as client:
            await client.declare("jobs", max_attempts=2, history=True)
            first = await client.publish("jobs", b"hello", headers={"trace": "t-1"})
            await client.publish_many("jobs", [b"a", b"b"])
            msgs = await client.fetch("jobs", max=10, lease=60)
            assert [m.payload for m in msgs] == [b"hello", b"a", b"b"]
            assert msgs[0].headers == {"trace": "t-1"}
            await client.nack(msgs[0], wait=True)
            await client.ack(msgs[1:], wait=True)
            [again] = await client.fetch("jobs", lease=60)
            assert (again.id, again.attempts) == (first, 2)
            await client.ack(again, wait=True)
            stats = await client.stats("jobs")
            assert (stats["ready"], stats["in_flight"], stats["total"]) == (0, 0, 0)
            life = await client.history("jobs", first)
            kinds = [e["kind"] for e in life["events"]]
            assert kinds == ["published", "delivered", "nacked", "delivered", "acked"]
    finally:
        node.stop()


async def test_a_long_poll_on_one_node_wakes_for_a_publish_on_another(nodes: list[ServerProcess]) -> None:
    a, b, _ = nodes
    async with replika.AsyncClient(a.url) as ca, replika.AsyncClient(b.url) as cb:
        waiting = asyncio.ensure_future(cb.fetch("wake", wait=WAIT, lease=60))
        await parked(b, "wake")
        await ca.publish("wake", b"from a")
        [msg] = await asyncio.wait_for(waiting, WAIT)
        assert msg.payload == b"from a"


async def test_a_delivery_of_one_node_is_acked_through_another(nodes: list[ServerProcess]) -> None:
    a, b, c = nodes
    async with (
        replika.AsyncClient(a.url) as ca,
        replika.AsyncClient(b.url) as cb,
        replika.AsyncClient(c.url) as cc,
    ):
        await ca.publish_many("cross", [b"1", b"2"])
        one, two = await cb.fetch("cross", max=2, lease=60)
        await cc.ack(one, wait=True)  # B granted the lease; C settles it: the token decides
        await cc.touch(two, 120, wait=True)
        with pytest.raises(replika.StaleLease):
            await ca.ack(one, wait=True)  # acked once only, whichever node is asked again
        await ca.nack(two, wait=True)
        [again] = await cc.fetch("cross", lease=60)
        assert (again.payload, again.attempts) == (b"2", 2)
        await cb.ack(again, wait=True)
        assert (await ca.stats("cross"))["total"] == 0


async def test_kill_9_of_a_node_under_load_loses_nothing_and_its_leases_come_back(
    nodes: list[ServerProcess],
) -> None:
    a, b, c = nodes
    confirmed: set[bytes] = set()
    acked: list[bytes] = []
    enough = asyncio.Event()
    stop = asyncio.Event()

    async def producer(url: str, n: int) -> None:
        async with replika.AsyncClient(url) as client:
            for i in range(100_000):
                if stop.is_set():
                    return
                batch = [f"{n}:{i}:{j}".encode() for j in range(1 + i % 5)]
                try:
                    await client.publish_many("load", batch)
                except (replika.ConnectionLost, replika.StoreUnavailable):
                    return  # not confirmed: nothing promised
                confirmed.update(batch)
                if len(confirmed) >= 1500:
                    enough.set()

    async def consumer(url: str) -> None:
        async with replika.AsyncClient(url) as client:
            while not stop.is_set():
                try:
                    msgs = await client.fetch("load", max=50, wait=0.5, lease=5)
                    if msgs:
                        await client.ack(msgs, wait=True)
                        acked.extend(m.payload for m in msgs)
                except (replika.ConnectionLost, replika.StaleLease):
                    return

    # B consumes while A and C publish; B then dies with leases in hand.
    victim_leases: list[replika.Message] = []
    async with replika.AsyncClient(b.url) as holder:
        tasks = [asyncio.ensure_future(producer(url, n)) for n, url in enumerate([a.url, c.url, a.url, c.url])]
        tasks.append(asyncio.ensure_future(consumer(c.url)))
        await asyncio.wait_for(enough.wait(), WAIT * 4)
        # Held, never settled; waited for, as the consumer on C may just have taken everything ready.
        victim_leases = await holder.fetch("load", max=100, wait=WAIT, lease=3)
        assert victim_leases
        b.kill()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    held = {m.payload for m in victim_leases}
    # Drain through A: B's leases come back when they expire (3 s), ended by A's or C's timer.
    async with replika.AsyncClient(a.url) as client:
        deadline = time.monotonic() + WAIT * 2
        while not confirmed <= set(acked) and time.monotonic() < deadline:
            msgs = await client.fetch("load", max=500, wait=1.0, lease=60)
            await client.ack(msgs, wait=True)
            acked.extend(m.payload for m in msgs)
    missing = confirmed - set(acked)
    assert not missing, f"{len(missing)} confirmed messages never delivered, e.g. {sorted(missing)[:5]}"
    assert held <= set(acked), "the killed node's leased messages were not delivered again"
    assert len(acked) == len(set(acked)), "a message was acked twice"


def test_backup_of_a_postgresql_store_points_to_postgresqls_own_tools(store_url: str, tmp_path: Path) -> None:
    for argv in (
        ["backup", "--store", store_url, str(tmp_path / "copy")],
        ["restore", str(tmp_path), "--store", store_url],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "replika_server", *argv], capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode != 0, done
        assert "PostgreSQL's own tools" in done.stderr + done.stdout, done
    assert not (tmp_path / "copy").exists()


async def test_every_nodes_admin_sidecar_shows_the_shared_queues(nodes: list[ServerProcess]) -> None:
    a, b, c = nodes
    async with replika.AsyncClient(a.url) as ca:
        await ca.publish_many("shown", [b"1", b"2", b"3"])
    for node in (b, c):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.admin_port}", timeout=WAIT) as admin:
            row = (await admin.get("/api/queues/shown")).json()
            assert (row["ready"], row["total"]) == (3, 3)
            assert row["counters"]["published"] == 0  # this node's events: the publishes went through A
            names = [q["queue"] for q in (await admin.get("/api/queues")).json()["queues"]]
            assert "shown" in names


async def test_a_killed_nodes_long_leases_come_back_after_its_heartbeat_stops(nodes: list[ServerProcess]) -> None:
    a, b, _ = nodes
    async with replika.AsyncClient(a.url) as ca:
        await ca.publish("orphans", b"held")
        async with replika.AsyncClient(b.url) as cb:
            [held] = await cb.fetch("orphans", lease=3600)  # would be held for an hour
            b.kill()
        # A and C see B's heartbeat stop (NODE_TIMEOUT, 15 s) and end its leases then, not in an hour.
        [again] = await ca.fetch("orphans", wait=WAIT, lease=60)
        assert (again.id, again.payload, again.attempts) == (held.id, b"held", 2)


async def test_nodes_creating_queues_at_once_hold_to_max_queues_together(store_url: str, tmp_path: Path) -> None:
    nodes = start_nodes(tmp_path, store_url, 3, "--max-queues", "4")
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(replika.AsyncClient(n.url)) for n in nodes for _ in range(4)]
            # Twelve creations at once, four through each node: each node's batch would count only what is
            # committed (and its own), so without one lock across the nodes each could create four.
            outcomes = await asyncio.gather(
                *(client.declare(f"q{i}", max_attempts=3) for i, client in enumerate(clients)), return_exceptions=True
            )
            refused = [o for o in outcomes if isinstance(o, replika.TooManyQueues)]
            assert [o for o in outcomes if o is not None and not isinstance(o, replika.TooManyQueues)] == []
            names = [q["queue"] for q in await clients[0].queues()]
            assert len(names) == 4 and len(refused) == 8, (names, outcomes)
    finally:
        for node in nodes:
            node.stop()
