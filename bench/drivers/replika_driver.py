"""Replika through its own SDK, exactly as a user would drive it."""

from __future__ import annotations

import contextlib

import replika
from bench.drivers.base import Driver


class ReplikaDriver(Driver):
    def __init__(self, url: str) -> None:
        self._client = replika.AsyncClient(url)

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    async def reset(self, queue: str) -> None:
        with contextlib.suppress(replika.NotFound):
            await self._client.delete_queue(queue)
        await self._client.declare(queue)

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        await self._client.publish_many(queue, payloads)

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self._client.publish(queue, payload)

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        msgs = await self._client.fetch(queue, max=max, wait=wait)
        if msgs:
            await self._client.ack(msgs)
        return [m.payload for m in msgs]
