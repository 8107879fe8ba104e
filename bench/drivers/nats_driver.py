"""NATS JetStream as a durable queue: a file-stored work-queue stream per queue, a durable pull consumer.

Durability comes from the server's JetStream settings (see bench/peers/nats_peer.py): with
``sync_interval: always`` the server fsyncs each write before it sends the PubAck.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from bench.drivers.base import Driver

CONSUMER = "c"
TIMEOUT = 30.0  # for one API request / PubAck / ack reply; generous, a timeout is a failure, not a measurement
# Publishes in flight without a PubAck yet (nats-py's default is 4,000): above any batch the harness sends, so a
# batch is written out whole before its acks are awaited.
MAX_PENDING = 1 << 20


def stream_name(queue: str) -> str:
    """Stream names may not contain '.', '*', '>', whitespace or path separators; subjects may have dots."""
    return re.sub(r"[.*>\s/\\]", "_", queue)


class JetStreamDriver(Driver):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("JetStreamDriver: not connected")
        return self._js

    async def connect(self) -> None:
        self._nc = await nats.connect(
            f"nats://{self.host}:{self.port}",
            allow_reconnect=False,  # a dropped connection is a failed run, not something to paper over
            connect_timeout=10,
            pending_size=64 * 1024 * 1024,  # client-side write buffer, so large batches are not refused
        )
        self._js = self._nc.jetstream(timeout=TIMEOUT, publish_async_max_pending=MAX_PENDING)

    async def close(self) -> None:
        self._subs.clear()
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
            self._js = None

    async def reset(self, queue: str) -> None:
        name = stream_name(queue)
        sub = self._subs.pop(queue, None)
        if sub is not None:
            await sub.unsubscribe()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(name)
        # A work-queue stream removes each message once it is acknowledged: a queue, like the other systems.
        await self.js.add_stream(
            StreamConfig(
                name=name,
                subjects=[queue],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
                num_replicas=1,
            )
        )
        await self.js.add_consumer(
            name,
            ConsumerConfig(
                durable_name=CONSUMER,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60.0,
                # Server default is 1,000 unacknowledged per consumer: several consumers fetching big batches
                # would stall on it. The harness acks every batch it fetches, so lift it.
                max_ack_pending=-1,
            ),
        )

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        # publish_async is nats-py's documented fast path: each message goes out at once with its own reply
        # inbox, and the returned futures resolve on the PubAcks (the server's confirm that the message is stored;
        # fsynced first with sync_interval: always). Awaiting all of them waits for every confirm, and any
        # failed PubAck raises here.
        futures = [await self.js.publish_async(queue, p) for p in payloads]
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self.js.publish(queue, payload)  # request / PubAck: one confirmed round trip

    async def _sub(self, queue: str) -> JetStreamContext.PullSubscription:
        sub = self._subs.get(queue)
        if sub is None:
            sub = await self.js.pull_subscribe_bind(CONSUMER, stream=stream_name(queue))
            self._subs[queue] = sub
        return sub

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        sub = await self._sub(queue)
        try:
            msgs = await sub.fetch(batch=max, timeout=wait if wait > 0.01 else 0.01)  # fetch needs a timeout > 0
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
            return []
        # ack_sync, not ack: ack() only publishes "+ACK" and returns, the server never says it got it, so an ack
        # could be lost (or still queued) when consume() returns. ack_sync() is a request the server answers once
        # it has processed the ack (the message is then removed from the work-queue stream), like XACK's reply in
        # Redis, beanstalkd's DELETED and Replika's ack reply. They go out together and are awaited together:
        # one round trip for the batch, as the others' batched acks.
        await asyncio.gather(*(m.ack_sync(timeout=TIMEOUT) for m in msgs))
        return [m.data for m in msgs]

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        # nats-py's pull-subscription loop: fetch a batch of 100, then ack_sync() each message, awaited.
        sub = await self._sub(queue)
        deadline = time.perf_counter() + seconds
        taken = 0
        while taken < count and time.perf_counter() < deadline:
            try:
                msgs = await sub.fetch(batch=100, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
                continue
            for m in msgs:
                await m.ack_sync(timeout=TIMEOUT)
                taken += 1
                if taken >= count or time.perf_counter() > deadline:
                    break
        return taken
