"""Once a second, every queue's stats: the rates the dashboard and API show, a short history for sparklines, and
the live feed (server-sent events) of the dashboard.

Rates come from the store's event counters (published, delivered, acked, nacked, dead-lettered), as differences
between two samples. Sampling is a Stats op in the broker's next batch: it reads memory and commits nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from replika_server.admin.seam import QueueStats

if TYPE_CHECKING:
    from replika_server.admin.ops import Ops

__all__ = ["Sampler"]

log = structlog.get_logger("replika.admin")

#: Seconds between samples.
INTERVAL = 1.0
#: Samples of history kept per queue (two minutes), for the queues seen first up to HISTORY_QUEUES.
HISTORY = 120
HISTORY_QUEUES = 256
#: Samples a slow live-feed subscriber may lag before it is dropped.
SUBSCRIBER_BACKLOG = 8
_RATES = (("publish", "published"), ("deliver", "delivered"), ("ack", "acked"), ("nack", "nacked"))
_RATE_NAMES = tuple(rate for rate, _ in _RATES)


class Sampler:
    def __init__(self, ops: Ops) -> None:
        self._ops = ops
        self._task: asyncio.Task[None] | None = None
        self._previous: dict[str, tuple[float, dict[str, int]]] = {}
        #: The latest sample: queue name -> its row (stats, dead-letter depth, consumers, rates per second).
        self.latest: dict[str, dict[str, Any]] = {}
        self.sampled_at = 0.0
        #: queue -> deque of [t, ready, in_flight, delayed, publish/s, ack/s]
        self.history: dict[str, collections.deque[list[float]]] = {}
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._sampled = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for q in list(self._subscribers):
            q.put_nowait(None)  # ends each live feed

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # the dashboard going stale must not take the broker down; say so and go on
                log.exception("admin_sample_failed")
            await asyncio.sleep(INTERVAL)

    async def sample(self) -> None:
        stats = await self._ops.all_stats()
        now = time.monotonic()
        by_name = {s.name: s for s in stats}
        rows: dict[str, dict[str, Any]] = {}
        previous = self._previous
        self._previous = {}
        for s in stats:
            counters = s.counters
            before = previous.get(s.name)
            rates: dict[str, float] = {}
            for rate, counter in _RATES:
                if before is None or now <= before[0]:
                    rates[rate] = 0.0
                else:
                    rates[rate] = round(
                        max(0, counters.get(counter, 0) - before[1].get(counter, 0)) / (now - before[0]), 2
                    )
            self._previous[s.name] = (now, dict(counters))
            rows[s.name] = self._row(s, by_name, rates)
            history = self.history.get(s.name)
            if history is None and len(self.history) < HISTORY_QUEUES:
                history = self.history[s.name] = collections.deque(maxlen=HISTORY)
            if history is not None:
                history.append([round(time.time(), 3), s.ready, s.in_flight, s.delayed, rates["publish"], rates["ack"]])
        for gone in set(self.history) - set(rows):
            del self.history[gone]
        self.latest = rows
        self.sampled_at = time.time()
        self._sampled.set()
        self._sampled = asyncio.Event()
        event = {"t": self.sampled_at, "info": self._ops.info(), "queues": list(rows.values())}
        for q in list(self._subscribers):
            if q.qsize() >= SUBSCRIBER_BACKLOG:
                self._subscribers.discard(q)  # too slow to follow: drop it rather than buffer for it
                q.put_nowait(None)
            else:
                q.put_nowait(event)

    def _row(self, s: QueueStats, by_name: dict[str, QueueStats], rates: dict[str, float]) -> dict[str, Any]:
        dead = by_name.get(s.dead_letter)
        row = s.as_dict()
        row["dead"] = dead.total if dead is not None else 0
        row["consumers"] = self._ops.consumers(s.name)
        row["rates"] = rates
        return row

    def overlay(self, stats: dict[str, Any]) -> dict[str, Any]:
        """One queue's row from its ``stats`` map read for this call, as :meth:`current` builds each: rates from the
        latest sample (zero for a queue created since), its dead-letter queue's depth as sampled, its consumers now.
        """
        dead = self.latest.get(stats["dead_letter"])
        return {
            **stats,
            "dead": dead["total"] if dead is not None else 0,
            "consumers": self._ops.consumers(stats["queue"]),
            "rates": self._rates(stats["queue"]),
        }

    async def current(self) -> list[dict[str, Any]]:
        """Every queue as it is now: counts read from the store for this call, rates from the latest sample.

        A listing must show the queue published to a moment ago (on PostgreSQL, perhaps through another node), so the
        rows are not the sample's, which may be a second old; a queue created since the sample has zero rates.
        """
        stats = await self._ops.all_stats()
        by_name = {s.name: s for s in stats}
        return [self._row(s, by_name, self._rates(s.name)) for s in stats]

    def _rates(self, queue: str) -> dict[str, float]:
        """The latest sample's rates of ``queue``; zero for a queue it has not seen."""
        sampled = self.latest.get(queue)
        return sampled["rates"] if sampled is not None else dict.fromkeys(_RATE_NAMES, 0.0)

    async def next_sample(self) -> None:
        """Wait for the next sample (tests and the first API call after start)."""
        await self._sampled.wait()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.discard(q)
