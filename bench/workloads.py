"""The workloads W1-W7, written once against :class:`~bench.drivers.base.Driver`.

Every workload is bounded in count and in time. Each returns a flat dict of metrics; throughput metrics end in
``msg/s``, latencies in ``us`` or ``ms``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.drivers.base import Driver, System

_STAMP = struct.Struct(">Q")


@dataclass(frozen=True)
class Params:
    """Workload parameters. Sizes in bytes, durations in seconds."""

    count: int = 100_000  # messages per run of W1, W2, W4, W5
    size: int = 256  # payload bytes
    batch: int = 1000  # messages per publish / fetch request
    connections: int = 1  # connections used by W1 and W2
    singles: int = 2000  # round trips in W3
    w4_rate: int = 2000  # msg/s the W4 latency run publishes at: low enough for every system to keep up
    w5_connections: tuple[int, ...] = (1, 16, 64, 256)
    w6_sizes: tuple[int, ...] = (16, 256, 4096, 65536, 1024 * 1024)
    w6_bytes: int = 64 * 1024 * 1024  # W6 moves at most this many payload bytes per size
    w7_count: int = 50_000  # messages W7's one-at-a-time consumer loops take at most per run
    w7_seconds: float = 10.0  # and for at most this long (the slow loops of some peers stop here)
    timeout: float = 300.0  # any single workload run


Workload = Callable[[System, Params], Awaitable[dict[str, float]]]


async def _drivers(system: System, n: int) -> list[Driver]:
    drivers = [system.make_driver() for _ in range(n)]
    await asyncio.gather(*(d.connect() for d in drivers))
    return drivers


async def _close(drivers: list[Driver]) -> None:
    await asyncio.gather(*(d.close() for d in drivers), return_exceptions=True)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _publish_all(drivers: list[Driver], queue: str, count: int, payload: bytes, batch: int) -> None:
    async def one(d: Driver, n: int) -> None:
        for i in range(0, n, batch):
            await d.publish(queue, [payload] * min(batch, n - i))

    await asyncio.gather(*(one(d, n) for d, n in zip(drivers, _split(count, len(drivers)), strict=True)))


async def _consume_all(drivers: list[Driver], queue: str, count: int, batch: int) -> float:
    """Consume ``count`` messages; return the perf_counter time at which the last one arrived (the other
    consumers' long polls still running then are not part of the measurement)."""
    got = 0
    done_at = 0.0

    async def one(d: Driver) -> None:
        nonlocal got, done_at
        while got < count:
            msgs = await d.consume(queue, batch, 1.0)
            got += len(msgs)
            if got >= count and not done_at:
                done_at = time.perf_counter()

    await asyncio.gather(*(one(d) for d in drivers))
    return done_at


def percentiles(samples: list[float], scale: float, unit: str, prefix: str = "") -> dict[str, float]:
    samples = sorted(samples)
    if not samples:
        return {}
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * scale  # noqa: E731
    return {f"{prefix}p50 {unit}": pick(0.5), f"{prefix}p99 {unit}": pick(0.99), f"{prefix}p999 {unit}": pick(0.999)}


async def w1_publish(system: System, p: Params) -> dict[str, float]:
    """W1: publish ``count`` messages in confirmed batches over ``connections`` connections."""
    drivers = await _drivers(system, p.connections)
    try:
        await drivers[0].reset("w1")
        start = time.perf_counter()
        await _publish_all(drivers, "w1", p.count, os.urandom(p.size), p.batch)
        return {"msg/s": p.count / (time.perf_counter() - start)}
    finally:
        await _close(drivers)


async def w2_fetch_ack(system: System, p: Params) -> dict[str, float]:
    """W2: fetch and ack (batched) a backlog of ``count`` messages."""
    drivers = await _drivers(system, p.connections)
    try:
        await drivers[0].reset("w2")
        await _publish_all(drivers, "w2", p.count, os.urandom(p.size), p.batch)
        start = time.perf_counter()
        done_at = await _consume_all(drivers, "w2", p.count, p.batch)
        return {"msg/s": p.count / (done_at - start)}
    finally:
        await _close(drivers)


async def w3_round_trips(system: System, p: Params) -> dict[str, float]:
    """W3: sequential single-message confirmed publishes; latency percentiles in microseconds."""
    [d] = await _drivers(system, 1)
    try:
        await d.reset("w3")
        payload = os.urandom(p.size)
        for _ in range(min(50, p.singles)):  # warm-up
            await d.publish_one("w3", payload)
        samples = []
        for _ in range(p.singles):
            t = time.perf_counter()
            await d.publish_one("w3", payload)
            samples.append(time.perf_counter() - t)
        return percentiles(samples, 1e6, "us")
    finally:
        await d.close()


def _stamped(size: int) -> Callable[[], bytes]:
    tail = os.urandom(max(0, size - _STAMP.size))
    return lambda: _STAMP.pack(time.perf_counter_ns()) + tail


async def _producer_consumer(
    system: System, queue: str, count: int, p: Params, rate: float | None, producers: int, consumers: int
) -> tuple[float, list[float]]:
    """Publish ``count`` stamped messages (at ``rate`` msg/s overall, or flat out) while consuming them."""
    prod = await _drivers(system, producers)
    cons = await _drivers(system, consumers)
    latencies: list[float] = []
    try:
        await prod[0].reset(queue)
        make = _stamped(p.size)
        got = 0

        async def produce(d: Driver, n: int) -> None:
            batch = p.batch if rate is None else max(1, min(p.batch, int(rate / 100 / producers)))
            interval = 0.0 if rate is None else batch * producers / rate
            next_at = time.perf_counter()
            for i in range(0, n, batch):
                await d.publish(queue, [make() for _ in range(min(batch, n - i))])
                if interval:
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)  # throttling to a rate: wall time is the point

        done_at = 0.0

        async def consume(d: Driver) -> None:
            nonlocal got, done_at
            while got < count:
                msgs = await d.consume(queue, p.batch, 1.0)
                now = time.perf_counter_ns()
                got += len(msgs)
                latencies.extend((now - _STAMP.unpack_from(m)[0]) / 1e9 for m in msgs)
                if got >= count and not done_at:
                    done_at = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(
            *(produce(d, n) for d, n in zip(prod, _split(count, producers), strict=True)), *(consume(d) for d in cons)
        )
        return count / (done_at - start), latencies
    finally:
        await _close(prod + cons)


async def w4_end_to_end(system: System, p: Params) -> dict[str, float]:
    """W4: one producer and one consumer at once: flat-out throughput, then latency at ``w4_rate`` msg/s."""
    throughput, _ = await _producer_consumer(system, "w4", p.count, p, None, 1, 1)
    n = min(p.count, p.w4_rate * 10)  # about ten seconds at the throttled rate
    _, lat = await _producer_consumer(system, "w4", n, p, float(p.w4_rate), 1, 1)
    return {"msg/s": throughput, **percentiles(lat, 1e3, "ms", f"@{p.w4_rate}/s ")}


async def w5_many_connections(system: System, p: Params) -> dict[str, float]:
    """W5: N connections (half producing, half consuming) at once, for each N of ``w5_connections``."""
    out: dict[str, float] = {}
    for n in p.w5_connections:
        producers, consumers = max(1, n // 2), max(1, n - n // 2)
        count = max(p.count // 4, producers * 10)
        rate, _ = await _producer_consumer(system, f"w5-{n}", count, p, None, producers, consumers)
        out[f"{n} conns msg/s"] = rate
    return out


async def w6_payload_sweep(system: System, p: Params) -> dict[str, float]:
    """W6: W1 and W2 for each payload size of ``w6_sizes``, moving at most ``w6_bytes`` per size."""
    out: dict[str, float] = {}
    [d] = await _drivers(system, 1)
    try:
        for size in p.w6_sizes:
            count = max(10, min(p.count, p.w6_bytes // size))
            batch = max(1, min(p.batch, (4 * 1024 * 1024) // size))  # keep each request a few MiB at most
            await d.reset("w6")
            payload = os.urandom(size)
            start = time.perf_counter()
            await _publish_all([d], "w6", count, payload, batch)
            mid = time.perf_counter()
            end = await _consume_all([d], "w6", count, batch)
            out[f"{_human(size)} publish msg/s"] = count / (mid - start)
            out[f"{_human(size)} fetch+ack msg/s"] = count / (end - mid)
        return out
    finally:
        await d.close()


async def w7_idiomatic_consumer(system: System, p: Params) -> dict[str, float]:
    """W7: the consumer loop each client library teaches first, one message at a time: take a message, ack it.
    A backlog of ``w7_count`` messages, one connection; each variant of the system's loop gets its own backlog."""
    out: dict[str, float] = {}
    [d] = await _drivers(system, 1)
    try:
        for variant in ("", *d.consume_variants):
            await d.reset("w7")
            await _publish_all([d], "w7", p.w7_count, os.urandom(p.size), p.batch)
            start = time.perf_counter()
            taken = await d.consume_each("w7", p.w7_count, p.w7_seconds, variant)
            out[f"{variant} msg/s".strip()] = taken / (time.perf_counter() - start)
        return out
    finally:
        await d.close()


def _human(size: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale:
            return f"{size // scale}{unit}"
    return f"{size}B"


WORKLOADS: dict[str, Workload] = {
    "W1": w1_publish,
    "W2": w2_fetch_ack,
    "W3": w3_round_trips,
    "W4": w4_end_to_end,
    "W5": w5_many_connections,
    "W6": w6_payload_sweep,
    "W7": w7_idiomatic_consumer,
}
