"""Replika through its own SDK, exactly as a user would drive it."""

from __future__ import annotations

import asyncio
import contextlib

import replika
from bench.drivers.base import Driver


class ReplikaDriver(Driver):
    def __init__(self, url: str) -> None:
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
        await self._client.declare(queue)

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
        # so the broker commits both together. The ack is still confirmed before this call returns.
        self._ahead[queue] = asyncio.ensure_future(self._client.fetch(queue, max=max, wait=wait))
        await self._client.ack(msgs)
        return [m.payload for m in msgs]
