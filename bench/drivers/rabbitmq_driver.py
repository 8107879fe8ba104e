"""RabbitMQ (AMQP 0-9-1) as a durable queue: durable classic queue, persistent messages, publisher confirms.

RabbitMQ confirms a persistent message routed to a durable queue once it has been written and fsynced, so an
awaited confirm is a durable confirm in its default configuration (see bench/peers/rabbitmq_peer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from bench.drivers.base import Driver

TIMEOUT = 30.0
#: W7's prefetch window: the default prefetch of Replika's consume(), so that both keep as much ahead.
W7_PREFETCH = 500


class _Consumer:
    """A basic.consume on its own channel (prefetch and multiple-acks are per channel), fed into a buffer."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, prefetch: int) -> None:
        self.channel = channel
        self.queue = queue
        self.prefetch = prefetch
        self.buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.tag: str | None = None

    async def on_message(self, msg: AbstractIncomingMessage) -> None:
        self.buffer.put_nowait(msg)

    async def close(self) -> None:
        # Closing the channel cancels the consumer; deliveries still unacknowledged go back to the queue.
        with contextlib.suppress(Exception):
            await self.channel.close()


class RabbitDriver(Driver):
    def __init__(self, host: str, port: int, user: str = "guest", password: str = "guest") -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self._conn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None
        self._consumers: dict[str, _Consumer] = {}

    @property
    def pub(self) -> AbstractChannel:
        if self._pub is None:
            raise RuntimeError("RabbitDriver: not connected")
        return self._pub

    @property
    def conn(self) -> AbstractConnection:
        if self._conn is None:
            raise RuntimeError("RabbitDriver: not connected")
        return self._conn

    async def connect(self) -> None:
        # A plain (not "robust") connection: a dropped connection fails the run instead of being re-established.
        self._conn = await aio_pika.connect(
            host=self.host, port=self.port, login=self.user, password=self.password, timeout=TIMEOUT
        )
        # Publisher confirms on; mandatory publishes whose message no queue takes raise instead of vanishing.
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        for c in self._consumers.values():
            await c.close()
        self._consumers.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
            self._pub = None

    async def reset(self, queue: str) -> None:
        c = self._consumers.pop(queue, None)
        if c is not None:
            await c.close()
        await self.pub.queue_delete(queue, timeout=TIMEOUT)  # deleting a missing queue is fine in RabbitMQ
        await self.pub.declare_queue(queue, durable=True, timeout=TIMEOUT)

    def _message(self, payload: bytes) -> aio_pika.Message:
        return aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        # All basic.publish frames go out at once; each publish() future resolves on its basic.ack confirm (a
        # basic.nack raises). The broker may confirm many with one multiple-ack; the library resolves them all.
        ex = self.pub.default_exchange
        await asyncio.gather(*(ex.publish(self._message(p), routing_key=queue, timeout=TIMEOUT) for p in payloads))

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self.pub.default_exchange.publish(self._message(payload), routing_key=queue, timeout=TIMEOUT)

    async def _consumer(self, queue: str, prefetch: int) -> _Consumer:
        c = self._consumers.get(queue)
        if c is None:
            channel = await self.conn.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch, timeout=TIMEOUT)
            q = await channel.declare_queue(queue, durable=True, passive=True, timeout=TIMEOUT)
            c = _Consumer(channel, q, prefetch)
            c.tag = await q.consume(c.on_message, no_ack=False, timeout=TIMEOUT)
            self._consumers[queue] = c
        elif c.prefetch != prefetch:
            await c.channel.set_qos(prefetch_count=prefetch, timeout=TIMEOUT)
            c.prefetch = prefetch
        return c

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        # A consumer with prefetch_count=max: the broker pushes up to max unacknowledged deliveries ahead of us,
        # and refills the window as acks come in. Wait up to `wait` for the first delivery, then take what has
        # arrived (letting the event loop hand over deliveries already read from the socket), at most max.
        c = await self._consumer(queue, max)
        try:
            first = await asyncio.wait_for(c.buffer.get(), wait) if wait > 0 else c.buffer.get_nowait()
        except (TimeoutError, asyncio.QueueEmpty):
            return []
        msgs = [first]
        while len(msgs) < max:
            if c.buffer.empty():
                await asyncio.sleep(0)  # deliveries are handed over by tasks the library spawns: let them run
                if c.buffer.empty():
                    break
            msgs.append(c.buffer.get_nowait())
        # One basic.ack with multiple=True for the batch (its delivery tags are consecutive on this channel, and
        # everything before them on the channel is already acked). AMQP 0-9-1 has no reply to basic.ack, so this
        # returns once the frame is written; the broker refills the prefetch window only after processing it,
        # so the next consume() cannot run ahead of the acks.
        await msgs[-1].ack(multiple=True)
        return [m.body for m in msgs]

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        # aio-pika's queue iterator with message.ack() per message, on a channel of its own with a prefetch
        # window. AMQP 0-9-1's basic.ack has no reply: ack() returns once the frame is written.
        channel = await self.conn.channel(publisher_confirms=False)
        deadline = time.perf_counter() + seconds
        taken = 0
        try:
            await channel.set_qos(prefetch_count=W7_PREFETCH, timeout=TIMEOUT)
            q = await channel.declare_queue(queue, durable=True, passive=True, timeout=TIMEOUT)
            async with q.iterator(timeout=TIMEOUT) as messages:
                async for message in messages:
                    await message.ack()
                    taken += 1
                    if taken >= count or time.perf_counter() > deadline:
                        break
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return taken
