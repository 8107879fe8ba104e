"""A publish-and-consume load that keeps a ledger of what the broker confirmed, and the check of a store against
it after a fault: nothing confirmed lost, nothing acked back, nothing made up.

The ledger is the clients' view, which is the only one a promise is made to: a publish is confirmed when its
reply came back ``ok``, an ack when its reply did. Anything still in flight when the fault struck may go either
way, and the check allows both.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import replika
from tests.conftest import WAIT

__all__ = ["Ledger", "drain", "run_load"]


@dataclass
class Ledger:
    """Payloads by fate, across every round of a test."""

    attempted: set[bytes] = field(default_factory=set)  # sent in a publish, confirmed or not
    confirmed: set[bytes] = field(default_factory=set)  # their publish was confirmed
    acking: set[bytes] = field(default_factory=set)  # sent in an ack, confirmed or not
    acked: set[bytes] = field(default_factory=set)  # their ack was confirmed
    refused: dict[str, int] = field(default_factory=dict)  # error codes the load met, by count
    # Confirmed although sent after some reply of the same broker said STORE_FAILED: a store that failed must
    # take no more writes.
    late: set[bytes] = field(default_factory=set)
    store_failed: bool = False  # a reply said STORE_FAILED during this load (reset by run_load)

    def violations(self, stored: set[bytes]) -> dict[str, list[bytes]]:
        """What ``stored`` (every payload in the store after the fault) breaks: ``lost`` (confirmed, never sent
        in an ack, gone: an ack in flight may have been applied), ``resurrected`` (acked and confirmed, back
        again), ``phantom`` (never published)."""
        found = {
            "lost": sorted(self.confirmed - self.acking - stored),
            "resurrected": sorted(stored & self.acked),
            "phantom": sorted(stored - self.attempted),
            "confirmed_after_store_failed": sorted(self.late),
        }
        return {kind: items for kind, items in found.items() if items}

    def settle(self, drained: set[bytes]) -> None:
        """``drained`` was fetched and acked by :func:`drain`, with every ack confirmed."""
        self.acking |= drained
        self.acked |= drained

    def note(self, exc: replika.ReplikaError) -> None:
        self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
        if exc.code == "STORE_FAILED":
            self.store_failed = True


async def _produce(client: replika.AsyncClient, queue: str, tag: str, ledger: Ledger, rng: random.Random) -> None:
    i = 0
    while True:
        batch = [f"{tag}:{i + j}".encode() for j in range(rng.choice((1, 1, 2, 5)))]
        i += len(batch)
        ledger.attempted.update(batch)
        after_failure = ledger.store_failed
        try:
            if len(batch) == 1:
                await client.publish(queue, batch[0])
            else:
                await client.publish_many(queue, batch)
        except replika.ReplikaError as exc:  # the fault: not confirmed, so nothing is promised
            ledger.note(exc)
            return
        ledger.confirmed.update(batch)
        if after_failure:
            ledger.late.update(batch)


async def _consume(client: replika.AsyncClient, queue: str, ledger: Ledger) -> None:
    while True:
        try:
            msgs = await client.fetch(queue, max=20, wait=0.2)
            if msgs:
                ledger.acking.update(m.payload for m in msgs)
                await client.ack(msgs, wait=True)  # confirmed means durable: an ack not waited for is in flight
        except replika.ReplikaError as exc:
            ledger.note(exc)
            return
        ledger.acked.update(m.payload for m in msgs)


async def run_load(
    url: str,
    queue: str,
    tag: str,
    ledger: Ledger,
    fault: Callable[[], Awaitable[object]],
    *,
    after: int,
    rng: random.Random,
    consumers: int = 2,
) -> object:
    """Publish (4 producers on 2 connections) and consume (``consumers`` on a third) on ``queue`` until ``after`` more
    publishes are confirmed, then await ``fault()`` while the load still runs, and wait for the load to end by
    itself on the errors the fault causes. Returns what ``fault`` returned."""
    clients = [replika.AsyncClient(url) for _ in range(3)]
    for client in clients:
        await client.connect()
    start = len(ledger.confirmed)
    ledger.store_failed = False  # a new broker (or a restarted one) owes nothing to an earlier one's failure
    tasks = [asyncio.ensure_future(_produce(clients[n % 2], queue, f"{tag}.{n}", ledger, rng)) for n in range(4)]
    tasks += [asyncio.ensure_future(_consume(clients[2], queue, ledger)) for _ in range(consumers)]
    try:
        async with asyncio.timeout(WAIT * 2):
            while len(ledger.confirmed) - start < after:
                done = [t for t in tasks if t.done()]
                assert not done, f"the load stopped before the fault: {[t.exception() for t in done]}"
                await asyncio.sleep(0.005)  # polling the ledger, which plain tasks fill: no event to await
        result = await fault()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
    return result


async def drain(url: str, queue: str) -> set[bytes]:
    """Every payload now in ``queue``, fetched and acked (check them against the ledger, then count them as
    acked: :meth:`Ledger.settle`)."""
    stored: set[bytes] = set()
    async with replika.AsyncClient(url) as client:
        while True:
            msgs = await client.fetch(queue, max=1000)
            if not msgs:
                return stored
            stored.update(m.payload for m in msgs)
            await client.ack(msgs, wait=True)
