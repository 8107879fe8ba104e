"""A well-behaved client's service while hostile peers attack the broker: ``python -m bench.hostile``.

Starts a broker as a child process, fills a queue with large messages, then holds ``--hostile`` connections
open at once, split between five kinds of abuse:

- silent: connect and send nothing;
- half-sent: declare a frame and send only part of it, then hold;
- huge: declare a 2 GiB frame (before, and after, the handshake), get refused, reconnect, repeat;
- garbage: random bytes, reconnecting after each refusal;
- slow readers: handshake, pipeline fetches with short leases (so that expired leases redeliver the same
  messages again and again) and never read a reply;
- reply flood: send megabytes of tiny requests that each earn an error reply (no id), never reading one.

Meanwhile a well-behaved client makes publish, fetch and ack round trips. Reports the well-behaved client's
latencies and the broker's anonymous memory (RssAnon: its heap, not the LMDB pages it maps) before and at the
peak. The broker runs with its default limits unless flags are passed after ``--``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import replika
from bench.broker import start_broker
from bench.memory import rss_anon_kib
from replika_protocol import encode_frame

HELLO = encode_frame({"op": "hello", "id": 0, "versions": [1], "client": "hostile"})
KINDS = ("silent", "half_sent", "huge", "garbage", "slow_reader", "reply_flood")


@dataclass
class Report:
    latencies: list[float] = field(default_factory=list)
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    open_at_peak: int = 0
    hostile_connects: int = 0

    def lines(self) -> list[str]:
        lat = sorted(self.latencies)
        return [
            f"hostile connections open at once: {self.open_at_peak} ({self.hostile_connects} connects in all)",
            f"well-behaved round trips (publish+fetch+ack): {len(lat)}, "
            f"median {statistics.median(lat) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms",
            f"broker RssAnon: {self.rss_before_kib / 1024:.1f} MiB before, {self.rss_peak_kib / 1024:.1f} MiB at peak "
            f"(+{(self.rss_peak_kib - self.rss_before_kib) / 1024:.1f} MiB)",
        ]


class Attack:
    def __init__(self, port: int, stop: asyncio.Event) -> None:
        self.port = port
        self.stop = stop
        self.open = 0
        self.connects = 0
        self.ready = 0
        self.expected = 0  # attackers started; all_ready is set once that many got going
        self.all_ready = asyncio.Event()

    def _got_going(self) -> None:
        self.ready += 1
        if self.ready >= self.expected:
            self.all_ready.set()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 30)
        self.connects += 1
        return reader, writer

    @contextlib.asynccontextmanager
    async def _held(self):  # type: ignore[no-untyped-def]
        reader, writer = await self._connect()
        self.open += 1
        try:
            yield reader, writer
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def silent(self) -> None:
        async with self._held():
            self._got_going()
            await self.stop.wait()

    async def half_sent(self) -> None:
        async with self._held() as (_, writer):
            writer.write(struct.pack(">I", 60_000) + os.urandom(1000))
            self._got_going()
            await self.stop.wait()

    async def _refused_until_stopped(self, payload: bytes) -> None:
        first = True
        while not self.stop.is_set():
            async with self._held() as (reader, writer):
                writer.write(payload)
                if first:
                    self._got_going()
                    first = False
                with contextlib.suppress(Exception):
                    while await asyncio.wait_for(reader.read(65536), 30):
                        pass  # until the broker closes it

    async def huge(self) -> None:
        await self._refused_until_stopped(struct.pack(">I", 2**31))

    async def huge_after_hello(self) -> None:
        await self._refused_until_stopped(HELLO + struct.pack(">I", 2**31 - 1))

    async def garbage(self) -> None:
        await self._refused_until_stopped(bytes(random.getrandbits(8) for _ in range(4096)))

    async def slow_reader(self) -> None:
        async with self._held() as (_, writer):
            fetches = b"".join(
                encode_frame({"op": "fetch", "id": i, "queue": "big", "max": 64, "lease": 0.2, "wait": 0})
                for i in range(1, 201)
            )
            writer.write(HELLO + fetches)
            self._got_going()
            await self.stop.wait()

    async def reply_flood(self) -> None:
        async with self._held() as (_, writer):
            junk = struct.pack(">I", 1) + b"\x80"  # {}: no id, so a BAD_REQUEST each, the connection staying open
            writer.write(HELLO)  # before the handshake the first such frame would close the connection
            self._got_going()
            for _ in range(160):  # 10 MiB, or less if the broker stops reading (then drain() blocks)
                writer.write(junk * 16384)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    break
            await self.stop.wait()


async def run(port: int, pid: int, hostile: int, round_trips: int, kinds: tuple[str, ...] = KINDS) -> Report:
    report = Report()
    async with replika.AsyncClient(f"replika://127.0.0.1:{port}") as client:
        payload = os.urandom(256 * 1024)
        for _ in range(4):
            await client.publish_many("big", [payload] * 16)  # 16 MiB that slow readers pull again and again
        report.rss_before_kib = rss_anon_kib(pid)
        stop = asyncio.Event()
        attack = Attack(port, stop)
        per_kind = hostile // len(kinds)
        tasks = [
            asyncio.ensure_future(getattr(attack, kind)()) for kind in kinds if kind != "huge" for _ in range(per_kind)
        ]
        if "huge" in kinds:
            tasks += [asyncio.ensure_future(attack.huge()) for _ in range(per_kind // 2)]
            tasks += [asyncio.ensure_future(attack.huge_after_hello()) for _ in range(per_kind - per_kind // 2)]
        attack.expected = len(tasks)
        try:
            try:
                await asyncio.wait_for(attack.all_ready.wait(), 60)
            except TimeoutError:
                raise SystemExit(f"only {attack.ready} of {len(tasks)} hostile connections got going") from None
            for i in range(round_trips):
                started = time.perf_counter()
                await client.publish("good", b"hello %d" % i)
                [msg] = await client.fetch("good", wait=30)
                await msg.ack(wait=True)  # the round trip includes the ack's commit, as before acks could be queued
                report.latencies.append(time.perf_counter() - started)
                report.open_at_peak = max(report.open_at_peak, attack.open)
                report.rss_peak_kib = max(report.rss_peak_kib, rss_anon_kib(pid))
                await asyncio.sleep(0.02)  # spread the round trips over the attack
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        report.hostile_connects = attack.connects
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=200, help="hostile connections held open (default 200)")
    parser.add_argument("--round-trips", type=int, default=100, help="well-behaved round trips (default 100)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated kinds of abuse (default: all of {','.join(KINDS)})"
    )
    parser.add_argument("broker_args", nargs="*", help="extra `replika serve` flags, after --")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="replika-hostile-") as tmp:
        broker = start_broker(Path(tmp), *args.broker_args, log_level="error")
        broker.wait_for_sidecar()  # loaded before the memory is read
        proc = broker.proc
        try:
            kinds = tuple(k for k in args.kinds.split(",") if k)
            unknown = set(kinds) - set(KINDS)
            if unknown:
                parser.error(f"unknown kinds: {sorted(unknown)}")
            report = asyncio.run(run(broker.port, proc.pid, args.hostile, args.round_trips, kinds))
            alive = proc.poll() is None
        finally:
            proc.kill()
            proc.wait(30)
    for line in report.lines():
        print(line)
    if not alive:
        print("the broker died", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
