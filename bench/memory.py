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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import replika


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


def start(data: Path, admin: bool = True) -> tuple[subprocess.Popen[bytes], str, float]:
    port_file = data / "port"
    port_file.unlink(missing_ok=True)
    (data / "admin-port").unlink(missing_ok=True)
    started = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "replika_server",
        "serve",
        "--port",
        "0",
        *(("--admin-port", "0", "--admin-port-file", str(data / "admin-port")) if admin else ("--no-admin",)),
        "--data-dir",
        str(data / "store"),
    ]
    proc = subprocess.Popen([*cmd, "--port-file", str(port_file), "--log-level", "warning"])
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.perf_counter() - started > 600:
            raise SystemExit("broker did not start")
        time.sleep(0.005)
    return proc, f"replika://127.0.0.1:{port_file.read_text()}", started


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


def sidecar_answers(data: Path) -> float:
    """When the admin sidecar answered ``/healthz``. Its port is bound before the broker's port file is
    written, so the request waits in the backlog while the sidecar loads; no polling."""
    port = (data / "admin-port").read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as reply:
        assert reply.status == 200
    return time.perf_counter()


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
        proc, url, _ = start(data, admin=not args.no_admin)
        asyncio.run(first_fetch_or_empty(url))
        if not args.no_admin:
            sidecar_answers(data)  # its libraries loaded: not counted as state per message
        before, before_anon = rss_kib(proc.pid), rss_anon_kib(proc.pid)
        asyncio.run(fill(url, args.count, args.size))
        after, after_anon = rss_kib(proc.pid), rss_anon_kib(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = sum(f.stat().st_size for f in (data / "store").iterdir())
        proc, url, started = start(data, admin=not args.no_admin)
        served = asyncio.run(first_fetch(url))
        sidecar = None if args.no_admin else sidecar_answers(data)
        restart_rss_anon = rss_anon_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    per_msg = (after_anon - before_anon) * 1024 / args.count
    print(f"messages: {args.count:,} x {args.size} B ({args.count // 10:,} leased, half of them acked)")
    print(f"RSS: {before:,} KiB before, {after:,} KiB after ({(after - before) * 1024 / args.count:.1f} B/msg)")
    print(f"anonymous RSS (the broker's own state): {before_anon:,} -> {after_anon:,} KiB = {per_msg:.1f} B/msg")
    print(f"store on disk: {store / 1024**2:,.0f} MiB")
    print(f"restart after kill -9 until the first fetch is served: {served - started:.2f} s")
    if sidecar is not None:
        print(f"restart after kill -9 until the admin sidecar answers /healthz: {sidecar - started:.2f} s")
    print(f"anonymous RSS after the restart: {restart_rss_anon:,} KiB")


async def first_fetch_or_empty(url: str) -> None:
    async with replika.AsyncClient(url) as c:
        await c.ping()


if __name__ == "__main__":
    main()
