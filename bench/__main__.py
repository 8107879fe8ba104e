"""First throughput figures through the SDK: ``python -m bench`` (or ``./dev bench``).

Starts a broker process on a temporary store (or uses ``--url``), then runs, each ``--runs`` times:
  W1 publish: ``publish_many`` in batches of ``--batch`` (every batch confirmed after its commit),
  W2 fetch + ack: ``fetch(max=batch)`` then ``ack(list)`` of the W1 backlog,
  W3 single publish round trips: sequential ``publish`` calls, latency percentiles.
With ``--redis``, the same workloads run against Redis Streams through redis-py asyncio (pipelined XADD;
XREADGROUP + XACK; single XADD) on a redis-server started here with ``appendfsync always``.
Prints medians with min-max spread. The full harness with more peers and workloads is issue 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import replika

Workload = Callable[[], Awaitable[dict[str, float]]]


def start_broker(data: Path, durability: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = data / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "replika_server",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data / "store"),
            "--port-file",
            str(port_file),
            "--durability",
            durability,
            "--log-level",
            "warning",
        ],
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("broker did not start")
        time.sleep(0.01)
    return proc, f"replika://127.0.0.1:{port_file.read_text()}"


def start_redis(data: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis: redis-server not installed, skipped", file=sys.stderr)
        return None
    port = 16379 + os.getpid() % 1000
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
    )
    return proc, port


async def replika_workloads(url: str, n: int, batch: int, size: int, singles: int) -> dict[str, Workload]:
    payload = os.urandom(size)

    async def w1() -> dict[str, float]:
        async with replika.AsyncClient(url) as c:
            start = time.perf_counter()
            for i in range(0, n, batch):
                await c.publish_many("bench", [payload] * min(batch, n - i))
            return {"msg/s": n / (time.perf_counter() - start)}

    async def w2() -> dict[str, float]:
        async with replika.AsyncClient(url) as c:
            start = time.perf_counter()
            done = 0
            while done < n:
                msgs = await c.fetch("bench", max=batch)
                if not msgs:
                    break
                await c.ack(msgs)
                done += len(msgs)
            return {"msg/s": done / (time.perf_counter() - start)}

    async def w3() -> dict[str, float]:
        async with replika.AsyncClient(url) as c:
            lat = []
            for _ in range(singles):
                t = time.perf_counter()
                await c.publish("bench-single", payload)
                lat.append(time.perf_counter() - t)
            await c.purge("bench-single")
            return latency(lat)

    return {"W1 publish": w1, "W2 fetch+ack": w2, "W3 single publish": w3}


async def redis_workloads(port: int, n: int, batch: int, size: int, singles: int) -> dict[str, Workload]:
    import redis.asyncio as aioredis

    payload = os.urandom(size)
    r = aioredis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            await r.ping()
            break
        except Exception:
            await asyncio.sleep(0.1)

    async def w1() -> dict[str, float]:
        await r.delete("bench")
        await r.xgroup_create("bench", "g", id="0", mkstream=True)
        start = time.perf_counter()
        for i in range(0, n, batch):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(batch, n - i)):
                pipe.xadd("bench", {"p": payload})
            await pipe.execute()
        return {"msg/s": n / (time.perf_counter() - start)}

    async def w2() -> dict[str, float]:
        start = time.perf_counter()
        done = 0
        while done < n:
            got = await r.xreadgroup("g", "c", {"bench": ">"}, count=batch)
            if not got or not got[0][1]:
                break
            ids = [mid for mid, _ in got[0][1]]
            await r.xack("bench", "g", *ids)
            done += len(ids)
        return {"msg/s": done / (time.perf_counter() - start)}

    async def w3() -> dict[str, float]:
        lat = []
        for _ in range(singles):
            t = time.perf_counter()
            await r.xadd("bench-single", {"p": payload})
            lat.append(time.perf_counter() - t)
        await r.delete("bench-single")
        return latency(lat)

    return {"W1 publish": w1, "W2 fetch+ack": w2, "W3 single publish": w3}


def latency(samples: list[float]) -> dict[str, float]:
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6  # noqa: E731
    return {"p50 us": pick(0.5), "p99 us": pick(0.99)}


async def run(system: str, workloads: dict[str, Workload], runs: int, table: dict[tuple[str, str], list]) -> None:
    for _ in range(runs):
        for name, fn in workloads.items():
            result = await fn()
            for metric, value in result.items():
                table.setdefault((system, f"{name} {metric}"), []).append(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="payload bytes")
    parser.add_argument("--singles", type=int, default=2000, help="round trips in W3")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--durability", choices=("sync", "relaxed"), default="sync")
    parser.add_argument("--redis", action="store_true", help="also run Redis Streams (appendfsync always)")
    args = parser.parse_args()
    table: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory(prefix="replika-bench-") as tmp:
        broker, url = start_broker(Path(tmp), args.durability)
        redis = start_redis(Path(tmp)) if args.redis else None
        try:

            async def go() -> None:
                w = await replika_workloads(url, args.messages, args.batch, args.size, args.singles)
                await run(f"replika ({args.durability})", w, args.runs, table)
                if redis is not None:
                    rw = await redis_workloads(redis[1], args.messages, args.batch, args.size, args.singles)
                    await run("redis streams (fsync always)", rw, args.runs, table)

            asyncio.run(go())
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait(30)
            if redis is not None:
                redis[0].terminate()
                redis[0].wait(30)
    print(f"{'system':32} {'metric':30} {'median':>12} {'min':>12} {'max':>12}")
    for (system, metric), values in table.items():
        print(f"{system:32} {metric:30} {statistics.median(values):12,.0f} {min(values):12,.0f} {max(values):12,.0f}")


if __name__ == "__main__":
    main()
