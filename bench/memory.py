"""Memory per stored message and restart time with a large backlog: ``python -m bench.memory``.

Starts a broker, reads its RSS, publishes ``--count`` messages (default 1,000,000 x 256 B), reads its RSS again
(state bytes per message = growth / count; LMDB's pages live in the page cache, mapped but mostly not counted as
the process's anonymous memory, so RSS also counts what the broker touched of the map), leases and acks 10% of
them so that some messages carry delivery state, then kills the broker with SIGKILL, starts it again and times
how long until the first fetch is served.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import replika
from bench.broker import start_broker


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon")


async def fill(url: str, count: int, size: int) -> None:
    payload = os.urandom(size)
    clients = [replika.AsyncClient(url) for _ in range(4)]
    for c in clients:
        await c.connect()

    async def one(c: replika.AsyncClient, n: int) -> None:
        for i in range(0, n, 1000):
            await c.publish_many("backlog", [payload] * min(1000, n - i))

    await asyncio.gather(*(one(c, count // 4) for c in clients))
    async with replika.AsyncClient(url) as c:
        leased = []
        while len(leased) < count // 10:  # some delivery state: 10% leased, half of those acked
            leased += await c.fetch("backlog", max=1000, lease=3600)
        await c.ack(leased[: len(leased) // 2])
    for c in clients:
        await c.close()


async def first_fetch(url: str) -> float:
    async with replika.AsyncClient(url) as c:
        msgs = await c.fetch("backlog", max=1)
        assert msgs, "the backlog is gone"
        return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--no-admin", action="store_true", help="run the broker without its admin sidecar (and its imports)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replika-mem-") as tmp:
        data = Path(tmp)
        admin = not args.no_admin
        broker = start_broker(data, admin=admin)
        asyncio.run(first_fetch_or_empty(broker.url))
        broker.wait_for_sidecar()  # its libraries loaded: not counted as state per message
        pid = broker.proc.pid
        before, before_anon = rss_kib(pid), rss_anon_kib(pid)
        asyncio.run(fill(broker.url, args.count, args.size))
        after, after_anon = rss_kib(pid), rss_anon_kib(pid)
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        store = sum(f.stat().st_size for f in (data / "store").iterdir())
        broker = start_broker(data, admin=admin)
        served = asyncio.run(first_fetch(broker.url))
        sidecar = broker.wait_for_sidecar() if admin else None
        restart_rss_anon = rss_anon_kib(broker.proc.pid)
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.wait(60)
    per_msg = (after_anon - before_anon) * 1024 / args.count
    print(f"messages: {args.count:,} x {args.size} B ({args.count // 10:,} leased, half of them acked)")
    print(f"RSS: {before:,} KiB before, {after:,} KiB after ({(after - before) * 1024 / args.count:.1f} B/msg)")
    print(f"anonymous RSS (the broker's own state): {before_anon:,} -> {after_anon:,} KiB = {per_msg:.1f} B/msg")
    print(f"store on disk: {store / 1024**2:,.0f} MiB")
    print(f"restart after kill -9 until the first fetch is served: {served - broker.started:.2f} s")
    if sidecar is not None:
        print(f"restart after kill -9 until the admin sidecar answers /healthz: {sidecar - broker.started:.2f} s")
    print(f"anonymous RSS after the restart: {restart_rss_anon:,} KiB")


async def first_fetch_or_empty(url: str) -> None:
    async with replika.AsyncClient(url) as c:
        await c.ping()


if __name__ == "__main__":
    main()
