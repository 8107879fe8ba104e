"""Replika through its own SDK, exactly as a user would drive it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import replika
from bench.drivers.base import Driver


class ReplikaDriver(Driver):
    consume_variants = ("blocking",)

    def __init__(self, url: str, history: bool = False) -> None:
        """``history``: declare each workload's queue with message history on (its defaults), to measure its cost."""
        self._url = url
        self._history = history
        self._client = replika.AsyncClient(url)
        self._ahead: dict[str, asyncio.Future[list[replika.Message]]] = {}  # the next fetch, per queue

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        for fetch in self._ahead.values():
            fetch.cancel()  # the SDK hands back whatever such a fetch still delivers
        self._ahead.clear()
        await self._client.close()

    async def reset(self, queue: str) -> None:
        ahead = self._ahead.pop(queue, None)
        if ahead is not None:
            ahead.cancel()
        with contextlib.suppress(replika.NotFound):
            await self._client.delete_queue(queue)
        await self._client.declare(queue, history=self._history)

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        await self._client.publish_many(queue, payloads)

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self._client.publish(queue, payload)

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        ahead = self._ahead.pop(queue, None)
        msgs = await ahead if ahead is not None else await self._client.fetch(queue, max=max, wait=wait)
        if not msgs:
            return []
        # Prefetch, as the SDK's consume() does: the next fetch leaves in the same write as this batch's ack,
        # so the broker commits both together. The ack is still confirmed before this call returns (wait=True),
        # as every peer's batched ack is: W2 measures settling durably, W7 the default, unwaited, ack.
        self._ahead[queue] = asyncio.ensure_future(self._client.fetch(queue, max=max, wait=wait))
        await self._client.ack(msgs, wait=True)
        return [m.payload for m in msgs]

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        if variant == "blocking":
            return await asyncio.to_thread(_blocking_loop, self._url, queue, count, seconds)
        # README's loop, as written there: consume() with its default prefetch, an awaited ack per message.
        deadline = time.perf_counter() + seconds
        taken = 0
        async for msg in self._client.consume(queue):
            await msg.ack()
            taken += 1
            if taken >= count or time.perf_counter() > deadline:
                break
        await self._client.flush()  # the clock stops once every ack is durable, as the peers' confirmed acks are
        return taken


def _blocking_loop(url: str, queue: str, count: int, seconds: float) -> int:
    """The blocking client's loop of README, on its own connection; closing it waits for every ack."""
    deadline = time.perf_counter() + seconds
    taken = 0
    with replika.Client(url) as client:
        for msg in client.consume(queue):
            msg.ack()
            taken += 1
            if taken >= count or time.perf_counter() > deadline:
                break
    return taken
