"""Redis Streams as a durable queue: XADD to publish, a consumer group's XREADGROUP + XACK to consume.

Durability comes from the server's AOF (see bench/peers/redis_peer.py): with ``appendfsync always`` Redis fsyncs
the AOF before it sends the replies of an event-loop iteration, so a received XADD reply is a durable confirm.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.drivers.base import Driver

GROUP = "g"
CONSUMER = "c"
FIELD = b"p"


class RedisStreamsDriver(Driver):
    """One connection (a pool capped at one) to one Redis server."""

    #: W2's batched consume also XDELs the acked ids (the default, see ``consume``); ``--redis-no-xdel`` clears
    #: it for every driver of the run, to measure Redis doing XACK alone (the stream then keeps every entry).
    xdel: bool = True

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._r: aioredis.Redis | None = None
        self._ahead: dict[str, list[Any]] = {}  # entries read ahead (already delivered to us), per stream

    @property
    def r(self) -> aioredis.Redis:
        if self._r is None:
            raise RuntimeError("RedisStreamsDriver: not connected")
        return self._r

    async def connect(self) -> None:
        # A pool of exactly one connection: this driver is one client connection, pipelines included.
        pool = aioredis.BlockingConnectionPool(host=self.host, port=self.port, max_connections=1, timeout=None)
        self._r = aioredis.Redis(connection_pool=pool)
        await self._r.ping()

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose(close_connection_pool=True)
            self._r = None

    async def reset(self, queue: str) -> None:
        self._ahead.pop(queue, None)
        await self.r.delete(queue)
        await self.r.xgroup_create(queue, GROUP, id="0", mkstream=True)

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        # The documented way to batch: a non-transactional pipeline, one round trip for the whole batch.
        pipe = self.r.pipeline(transaction=False)
        for p in payloads:
            pipe.xadd(queue, {FIELD: p})
        await pipe.execute()  # raises on any failed XADD

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self.r.xadd(queue, {FIELD: payload})

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        entries = self._ahead.pop(queue, None)
        if entries is None:
            # BLOCK 0 means "forever" to Redis: without a wait, read without BLOCK.
            block = (int(wait * 1000) or 1) if wait > 0 else None
            entries = _entries(await self.r.xreadgroup(GROUP, CONSUMER, {queue: ">"}, count=max, block=block))
        if not entries:
            return []
        ids = [entry_id for entry_id, _ in entries]
        payloads: list[bytes] = [fields[FIELD] for _, fields in entries]
        # XACK of all ids in one call. XDEL of the same ids rides in the same round trip: XACK only clears the
        # group's pending list, the entries stay in the stream, and every other system here frees a message once
        # it is acknowledged; without it the stream (memory, AOF) would grow by every message ever consumed.
        # The next batch is read (without BLOCK, so the acks' replies are not held up) in that round trip too:
        # the same prefetching the Replika driver does with its SDK.
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(queue, GROUP, *ids)
        if self.xdel:
            pipe.xdel(queue, *ids)
        pipe.xreadgroup(GROUP, CONSUMER, {queue: ">"}, count=max)
        replies = await pipe.execute()
        acked, ahead = replies[0], replies[-1]
        if acked != len(ids):
            raise ResponseError(f"XACK acknowledged {acked} of {len(ids)} entries")
        if ahead_entries := _entries(ahead):
            self._ahead[queue] = ahead_entries
        return payloads

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        # redis-py's consumer-group loop: XREADGROUP COUNT 100, then an XACK per entry, each awaited (with
        # appendfsync always, each XACK's reply waits for the AOF fsync of its event-loop iteration).
        deadline = time.perf_counter() + seconds
        taken = 0
        while taken < count and time.perf_counter() < deadline:
            reply = await self.r.xreadgroup(GROUP, CONSUMER, {queue: ">"}, count=100, block=1000)
            for entry_id, _fields in _entries(reply):
                await self.r.xack(queue, GROUP, entry_id)
                taken += 1
                if taken >= count or time.perf_counter() > deadline:
                    break
        return taken


def _entries(reply: Any) -> list[Any]:
    """Entries of an XREADGROUP reply (RESP2: [[stream, [(id, {field: value}), ...]]])."""
    return list(reply[0][1]) if reply and reply[0][1] else []
