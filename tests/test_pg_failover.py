"""Failover under load (issue 15): two ``replika serve`` nodes on a primary with a synchronous streaming standby,
reached through libpq's multi-host URL (``target_session_attrs=read-write``). During a publish load the standby is
promoted and the primary stopped as a crash would stop it. Publishers see only retriable errors for what was not
confirmed, the same nodes go on against the new primary, and every confirmed message is there afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import replika
from tests.conftest import WAIT, ServerProcess
from tests.pg import ReplicatedPair

pytestmark = pytest.mark.postgres

#: Errors a publisher may see for a request that was not confirmed, and retries.
RETRIABLE = (replika.StoreUnavailable, replika.ConnectionLost)
#: Confirmed messages before the switch, and per publisher after it.
BEFORE, AFTER = 400, 40
#: Seconds of the publishers' retry backoff: first and largest.
BACKOFF, MAX_BACKOFF = 0.05, 0.5


@dataclass
class Load:
    """What the publishers have been told: confirmed payloads, the retriable errors they met."""

    confirmed: set[bytes] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    switched: asyncio.Event = field(default_factory=asyncio.Event)
    enough: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def nodes(tmp_path: Path, replicated_postgres: ReplicatedPair) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for i in range(2):
            (tmp_path / f"node{i}").mkdir()
            started.append(ServerProcess(tmp_path / f"node{i}" / "data", "--store", replicated_postgres.url).start())
        yield started
    finally:
        for node in started:
            node.stop()


async def publish_until_done(url: str, n: int, load: Load) -> None:
    """Publish small batches through ``url`` until :data:`AFTER` of them were confirmed after the switch,
    retrying what got a retriable error with a bounded backoff."""
    deadline = time.monotonic() + WAIT * 2
    after = 0
    async with replika.AsyncClient(url) as client:
        for i in range(100_000):
            batch = [f"{n}:{i}:{j}".encode() for j in range(1 + i % 3)]
            backoff = BACKOFF
            while True:
                assert time.monotonic() < deadline, f"publisher {n} never got through: {load.errors[-3:]}"
                after_switch = load.switched.is_set()
                try:
                    await client.publish_many("failover", batch)
                    break
                except RETRIABLE as exc:  # nothing of it was confirmed: publish it again
                    load.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(backoff)  # a retry's backoff, not a wait for a condition
                    backoff = min(backoff * 2, MAX_BACKOFF)
            load.confirmed.update(batch)
            if len(load.confirmed) >= BEFORE:
                load.enough.set()
            after += after_switch  # sent once the old primary was gone: confirmed by the new one
            if after >= AFTER:
                return
    raise AssertionError("unreachable: the loop ends at AFTER confirms after the switch")


async def test_promote_the_standby_and_stop_the_primary_under_load_loses_no_confirmed_message(
    nodes: list[ServerProcess], replicated_postgres: ReplicatedPair
) -> None:
    load = Load()
    a, b = nodes
    publishers = [asyncio.ensure_future(publish_until_done(url, n, load)) for n, url in enumerate([a.url, b.url] * 2)]
    await asyncio.wait_for(load.enough.wait(), WAIT)
    # Promote first, then stop: a commit the old primary takes meanwhile waits for the standby that no longer
    # streams from it, so it is never confirmed, and the stop cuts it off with an error.
    await asyncio.to_thread(replicated_postgres.promote)
    await asyncio.to_thread(replicated_postgres.stop_primary)
    load.switched.set()
    await asyncio.wait_for(asyncio.gather(*publishers), WAIT * 3)

    drained: set[bytes] = set()
    async with replika.AsyncClient(a.url) as client:
        deadline = time.monotonic() + WAIT
        while not load.confirmed <= drained:
            assert time.monotonic() < deadline, f"{len(load.confirmed - drained)} confirmed messages not drained"
            msgs = await client.fetch("failover", max=500, wait=1.0, lease=60)
            await client.ack(msgs, wait=True)
            drained.update(m.payload for m in msgs)
        assert (await client.stats("failover"))["in_flight"] == 0
    missing = load.confirmed - drained
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
