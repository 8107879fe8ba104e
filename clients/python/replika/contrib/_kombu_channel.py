"""The kombu channel of the Replika transport: AMQP's methods on Replika's operations.

``basic_consume`` starts a fetch loop on the bridge's event loop; its messages reach the consumer's callback on
the thread that drains the connection (the Celery worker's event loop, or whoever calls ``drain_events``). A
delivery is a Replika lease that the bridge keeps alive with ``touch`` until it is settled: ``basic_ack`` is an
ack, ``basic_reject(requeue=True)`` a nack (ready again after the queue's retry delay, at once by default) and
``basic_reject(requeue=False)`` a reject, to the dead-letter queue. ``basic_qos``'s prefetch count bounds how many
messages of the channel are leased at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.message import Message as KombuMessage
from kombu.transport.base import StdChannel, to_rabbitmq_queue_arguments

from replika import AsyncClient, NotFound
from replika import Message as ReplikaMessage
from replika.contrib import _kombu_codec as codec
from replika.contrib._holder import Budget, Settle, feed
from replika.contrib._names import binding_pattern, queue_name, topic

if TYPE_CHECKING:
    from replika.contrib.kombu import Link, Transport

__all__ = ["Channel"]

EXCHANGE_TYPES = frozenset({"direct", "topic", "fanout"})
_channel_ids = itertools.count(1)


@dataclass(eq=False)
class Consumer:
    """One ``basic_consume``: kombu's queue name, Replika's, and the fetch loop feeding it."""

    tag: str
    queue: str
    rqueue: str
    channel: Channel
    callback: Callable[[KombuMessage], Any]
    no_ack: bool
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    budget: Budget = field(default_factory=Budget)


class Channel(StdChannel):
    """A kombu channel on one Replika connection (its transport's :class:`~replika.contrib.kombu.Link`)."""

    Message = KombuMessage

    def __init__(self, transport: Transport, link: Link) -> None:
        self.connection = transport  # kombu reaches its Connection as channel.connection.client
        self.link = link
        self.channel_id = next(_channel_ids)
        self.no_ack_consumers: set[str] = set()  # type: ignore[assignment]
        self.closed = False
        self.budget = Budget()
        self._consumers: dict[str, Consumer] = {}
        self._delivered: OrderedDict[int, tuple[ReplikaMessage, Budget | None]] = OrderedDict()
        self._tags = itertools.count(1)
        self._auto_delete: set[str] = set()

    # ----------------------------------------------------------------------------------------------- publishing
    def prepare_message(
        self,
        body: Any,
        priority: int | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        props = {} if properties is None else properties
        # kombu hands a retried publish the same properties dict: the id set here on the first try makes the
        # broker store the message once, however many times a lost confirm makes kombu send it.
        props.setdefault("replika_publish_id", uuid.uuid4().hex)
        props.setdefault("priority", priority or 0)
        return {
            "body": body,
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers or {},
            "properties": props,
        }

    def basic_publish(self, message: dict[str, Any], exchange: str = "", routing_key: str = "", **_: Any) -> None:
        out = codec.encode(message, exchange or "", routing_key or "")
        kw: dict[str, Any] = {"headers": out.headers, "priority": out.priority or None}
        kw.update(delay=out.delay or None, ttl=out.ttl, dedup_id=out.dedup_id)
        if not exchange:
            dest = queue_name(routing_key)
            self.link.bridge.call(lambda c: c.publish(dest, out.payload, **kw))
        else:
            name = topic(exchange, routing_key or "")
            self.link.bridge.call(lambda c: c.publish_topic(name, out.payload, **kw))

    # ----------------------------------------------------------------------------------------------- entities
    def exchange_declare(self, exchange: str = "", type: str = "direct", **_: Any) -> None:
        if type not in EXCHANGE_TYPES:
            raise NotImplementedError(
                f"replika: exchange type {type!r} is not supported (Replika routes by topic patterns: "
                f"direct, topic and fanout exchanges work)"
            )
        if exchange:
            self.link.exchange_types[exchange] = type

    def exchange_delete(self, exchange: str, **_: Any) -> None:
        self.link.exchange_types.pop(exchange, None)

    def prepare_queue_arguments(self, arguments: dict[str, Any] | None, **kwargs: Any) -> dict[str, Any]:
        return dict(to_rabbitmq_queue_arguments(arguments or {}, **kwargs))

    def queue_declare(
        self,
        queue: str = "",
        passive: bool = False,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        **_: Any,
    ) -> Any:
        queue = queue or f"amq.gen-{uuid.uuid4().hex}"
        rq = queue_name(queue)
        if auto_delete or exclusive:
            self._auto_delete.add(queue)
        options = self.link.queue_options(queue, arguments)
        stats = self.link.bridge.call(lambda c: _declare(c, rq, options, passive))
        if stats is None:
            raise ChannelError(f"NOT_FOUND - no queue {queue!r} (Replika queue {rq!r})")
        return queue_declare_ok_t(queue, int(stats.get("ready", 0)), 0)

    def queue_bind(self, queue: str, exchange: str = "", routing_key: str = "", **_: Any) -> None:
        if exchange:
            rq, pattern = queue_name(queue), self._pattern(exchange, routing_key)
            self.link.bridge.call(lambda c: c.bind(rq, pattern))

    def queue_unbind(self, queue: str, exchange: str = "", routing_key: str = "", **_: Any) -> None:
        if exchange:
            rq, pattern = queue_name(queue), self._pattern(exchange, routing_key)
            self.link.bridge.call(lambda c: _ignore_missing(c.unbind(rq, pattern)))

    def _pattern(self, exchange: str, routing_key: str) -> str:
        return binding_pattern(exchange, self.link.exchange_types.get(exchange, "direct"), routing_key or "")

    def queue_purge(self, queue: str, **_: Any) -> int:
        rq = queue_name(queue)
        return self.link.bridge.call(lambda c: c.purge(rq))

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **_: Any) -> int:
        rq = queue_name(queue)
        self._auto_delete.discard(queue)
        self.link.bridge.call(lambda c: _ignore_missing(c.delete_queue(rq)))
        return 0

    def after_reply_message_received(self, queue: str) -> None:
        self.queue_delete(queue)

    # ----------------------------------------------------------------------------------------------- consuming
    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, apply_global: bool = False) -> None:
        self.link.bridge.soon(self.budget.set_limit, int(prefetch_count or 0))

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Callable[[KombuMessage], Any], consumer_tag: str, **_: Any
    ) -> str:
        consumer = Consumer(consumer_tag, queue, queue_name(queue), self, callback, no_ack)
        consumer.budget = Budget() if no_ack else self.budget
        self._consumers[consumer_tag] = consumer
        if no_ack:
            self.no_ack_consumers.add(consumer_tag)
        self.link.bridge.soon(self._start_feed, consumer)
        return consumer_tag

    def _start_feed(self, consumer: Consumer) -> None:  # on the bridge's loop
        if consumer.cancelled:
            return
        bridge = self.link.bridge

        def deliver(msgs: list[ReplikaMessage]) -> None:
            due_now = [m for m in msgs if not codec.remaining_delay(m)]
            for m in msgs:
                if codec.remaining_delay(m):
                    asyncio.get_running_loop().create_task(self.link.redelay(m, consumer))
            if due_now:
                self.link.inbox.put([(consumer, m) for m in due_now])

        coro = feed(bridge.holder, consumer.rqueue, consumer.budget, deliver, logger=bridge.log, no_ack=consumer.no_ack)
        consumer.task = asyncio.get_running_loop().create_task(coro)

    def basic_cancel(self, consumer_tag: str) -> None:
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is None:
            return
        consumer.cancelled = True
        self.no_ack_consumers.discard(consumer_tag)
        self.link.bridge.soon(_cancel, consumer)
        if consumer.queue in self._auto_delete and not any(c.queue == consumer.queue for c in self._consumers.values()):
            self.queue_delete(consumer.queue)

    def dispatch(self, consumer: Consumer, msg: ReplikaMessage) -> None:
        """Hand one fetched message to its consumer (on the draining thread)."""
        budget = None if consumer.no_ack else consumer.budget
        if consumer.cancelled or self.closed:
            if not consumer.no_ack:
                self.link.bridge.settle("requeue", [msg], budget)
            return
        tag = next(self._tags)
        if not consumer.no_ack:
            self._delivered[tag] = (msg, budget)
            self.link.outstanding += 1
        consumer.callback(self._to_kombu(msg, tag, consumer))

    def _to_kombu(self, msg: ReplikaMessage, tag: int, consumer: Consumer) -> KombuMessage:
        inc = codec.decode(msg)
        props = dict(inc.properties)
        props["delivery_tag"] = tag
        info = {
            "exchange": inc.exchange,
            "routing_key": inc.routing_key,
            "consumer_tag": consumer.tag,
            "redelivered": msg.attempts > 1,
            "priority": props.get("priority", 0),
        }
        props["delivery_info"] = info
        return KombuMessage(
            body=inc.body,
            delivery_tag=tag,
            content_type=inc.content_type,
            content_encoding=inc.content_encoding,
            delivery_info=info,
            properties=props,
            headers=inc.headers,
            channel=self,
            postencode="utf-8",
        )

    def message_to_python(self, raw: Any) -> Any:
        return raw

    def basic_get(self, queue: str, no_ack: bool = False, **_: Any) -> KombuMessage | None:
        rq = queue_name(queue)
        msgs = self.link.bridge.call(lambda c: c.fetch(rq, max=1, wait=0.0, lease=self.link.bridge.lease))
        if not msgs:
            return None
        msg = msgs[0]
        tag = next(self._tags)
        if no_ack:
            self.link.bridge.settle("ack", [msg])
        else:
            self.link.bridge.soon(self.link.bridge.holder.hold, [msg])
            self._delivered[tag] = (msg, None)
        consumer = Consumer("", queue, rq, self, lambda m: None, no_ack)
        return self._to_kombu(msg, tag, consumer)

    # ----------------------------------------------------------------------------------------------- settling
    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._settle("ack", delivery_tag, multiple)

    def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        self._settle("nack" if requeue else "reject", delivery_tag, False)

    def basic_recover(self, requeue: bool = True) -> None:
        if not requeue:
            raise NotImplementedError("replika: basic_recover(requeue=False) is not supported")
        self._settle_all("nack")

    def _settle(self, op: Settle, delivery_tag: int, multiple: bool) -> None:
        tags = [t for t in self._delivered if t <= delivery_tag] if multiple else [delivery_tag]
        for t in tags:
            entry = self._delivered.pop(t, None)
            if entry is not None:
                self.link.settle(op, entry[0], entry[1], delivered=True)

    def _settle_all(self, op: Settle) -> None:
        delivered, self._delivered = self._delivered, OrderedDict()
        for msg, budget in delivered.values():
            self.link.settle(op, msg, budget, delivered=True)

    def flow(self, active: bool = True) -> None:
        raise NotImplementedError("replika: channel.flow is not supported")

    def close(self) -> None:
        """Cancel the consumers. Unlike AMQP, messages delivered and not settled are not requeued here: they
        stay leased to the connection, so that a Celery task still running in the pool during a warm shutdown
        (Celery closes its channel first) is acked when it ends, not run again elsewhere meanwhile. They go
        back when the connection closes (see :meth:`Link.close`)."""
        if self.closed:
            return
        for tag in list(self._consumers):
            self.basic_cancel(tag)
        self.closed = True
        if self.connection is not None:
            self.connection.close_channel(self)


def _cancel(consumer: Consumer) -> None:  # on the bridge's loop
    if consumer.task is not None:
        consumer.task.cancel()


async def _ignore_missing(call: Any) -> None:
    with contextlib.suppress(NotFound):
        await call


async def _declare(
    client: AsyncClient, queue: str, options: dict[str, Any] | None, passive: bool
) -> dict[str, Any] | None:
    """The queue's stats after making sure it exists (None: passive, and it does not). A queue without options
    of its own is never re-declared: ``declare`` replaces options as a whole, and an operator may have set some."""
    if options:
        await client.declare(queue, **options)
    try:
        return await client.stats(queue)
    except NotFound:
        if passive:
            return None
    await client.declare(queue)
    return await client.stats(queue)
