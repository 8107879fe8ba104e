"""beanstalkd as a durable queue, through a small asyncio client of its text protocol.

Why not greenstalk (the maintained Python client): it is synchronous and sends one command per round trip.
Run in a thread it would add a thread hop per call that no other driver pays, and it cannot pipeline. The
protocol is a simple line protocol that answers commands in order, so this client writes a whole batch of
commands (puts, reserves, deletes) at once and then reads the replies: the same batching the other drivers get
from their clients (Redis pipelines, NATS async publishes, AMQP confirms). beanstalkd processes the commands one
by one either way; with ``-f 0`` it fsyncs its binlog before each reply (see bench/peers/beanstalkd_peer.py).

Tube = queue. Jobs are put with one priority, no delay and a TTR longer than any run, so they come out FIFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from bench.drivers.base import Driver

PRIORITY = 1 << 31  # the middle of the range; all jobs equal, so reserve order is put order
TTR = 600  # seconds a reserved job stays ours before beanstalkd would hand it out again
TIMEOUT = 60.0


class BeanstalkError(Exception):
    pass


class BeanstalkDriver(Driver):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None
        self._using: str | None = None
        self._watching: str | None = None
        self._lock = asyncio.Lock()  # one exchange (commands out, replies in) at a time on the connection

    async def connect(self) -> None:
        self._r, self._w = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=4 * 1024 * 1024), TIMEOUT
        )
        self._using = "default"
        self._watching = None

    async def close(self) -> None:
        if self._w is not None:
            w = self._w
            self._r = self._w = None
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()

    # --- protocol -------------------------------------------------------------------------------------------

    @property
    def reader(self) -> asyncio.StreamReader:
        if self._r is None:
            raise RuntimeError("BeanstalkDriver: not connected")
        return self._r

    @property
    def writer(self) -> asyncio.StreamWriter:
        if self._w is None:
            raise RuntimeError("BeanstalkDriver: not connected")
        return self._w

    async def _line(self) -> list[bytes]:
        line = await self.reader.readuntil(b"\r\n")
        return line[:-2].split(b" ")

    async def _body(self, size: int) -> bytes:
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def _simple(self, command: bytes, ok: bytes) -> list[bytes]:
        async with asyncio.timeout(TIMEOUT):
            self.writer.write(command)
            await self.writer.drain()
            reply = await self._line()
        if reply[0] != ok:
            raise BeanstalkError(f"{command.strip().decode()!r}: {b' '.join(reply).decode()}")
        return reply

    async def _use(self, tube: str) -> None:
        if self._using != tube:
            await self._simple(b"use " + tube.encode() + b"\r\n", b"USING")
            self._using = tube

    async def _watch(self, tube: str) -> None:
        """Watch exactly ``tube`` (reserve takes jobs from the watched tubes)."""
        if self._watching != tube:
            await self._simple(b"watch " + tube.encode() + b"\r\n", b"WATCHING")
            old = self._watching or "default"
            if old != tube:
                await self._simple(b"ignore " + old.encode() + b"\r\n", b"WATCHING")
            self._watching = tube

    async def _reserve_many(self, first_timeout: int, n: int) -> list[tuple[bytes, bytes]]:
        """One ``reserve-with-timeout first_timeout``, then (if it got a job) n-1 ``reserve-with-timeout 0``
        pipelined: the jobs ready right now, at most n. Returns [(id, body)] in reserve order."""
        w = self.writer
        w.write(b"reserve-with-timeout %d\r\n" % first_timeout)
        await w.drain()
        jobs: list[tuple[bytes, bytes]] = []
        reply = await self._line()
        if reply[0] != b"RESERVED":
            if reply[0] in (b"TIMED_OUT", b"DEADLINE_SOON"):
                return jobs
            raise BeanstalkError(f"reserve: {b' '.join(reply).decode()}")
        jobs.append((reply[1], await self._body(int(reply[2]))))
        if n > 1:
            w.write(b"reserve-with-timeout 0\r\n" * (n - 1))
            await w.drain()
            for _ in range(n - 1):  # read every reply, also after the first TIMED_OUT
                reply = await self._line()
                if reply[0] == b"RESERVED":
                    jobs.append((reply[1], await self._body(int(reply[2]))))
                elif reply[0] not in (b"TIMED_OUT", b"DEADLINE_SOON"):
                    raise BeanstalkError(f"reserve: {b' '.join(reply).decode()}")
        return jobs

    async def _delete_many(self, ids: list[bytes]) -> None:
        if not ids:
            return
        self.writer.write(b"".join(b"delete " + i + b"\r\n" for i in ids))
        await self.writer.drain()
        bad = []
        for i in ids:
            reply = await self._line()
            if reply[0] != b"DELETED":
                bad.append(f"{i.decode()}: {b' '.join(reply).decode()}")
        if bad:
            raise BeanstalkError(f"delete failed for {len(bad)} job(s): {', '.join(bad[:5])}")

    # --- Driver ---------------------------------------------------------------------------------------------

    async def reset(self, queue: str) -> None:
        """Drain the tube: kick buried/delayed jobs back to ready, then reserve + delete everything ready."""
        async with self._lock:
            await self._use(queue)
            await self._watch(queue)
            while True:  # kick moves buried jobs, or if there are none, delayed ones; repeat until nothing moves
                reply = await self._simple(b"kick 1000000000\r\n", b"KICKED")
                if reply[1] == b"0":
                    break
            while True:
                async with asyncio.timeout(TIMEOUT):
                    jobs = await self._reserve_many(0, 1000)
                    await self._delete_many([i for i, _ in jobs])
                if not jobs:
                    break

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        async with self._lock:
            await self._use(queue)
            head = b"put %d 0 %d " % (PRIORITY, TTR)
            async with asyncio.timeout(TIMEOUT):
                self.writer.write(b"".join(b"%s%d\r\n%s\r\n" % (head, len(p), p) for p in payloads))
                await self.writer.drain()
                errors = []
                for _ in payloads:  # INSERTED <id> for each, in order; with -f 0 each after its binlog fsync
                    reply = await self._line()
                    if reply[0] != b"INSERTED":
                        errors.append(b" ".join(reply).decode())
            if errors:
                raise BeanstalkError(f"put failed for {len(errors)} job(s): {errors[0]}")

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        # reserve-with-timeout takes whole seconds: round a fractional wait up (0 stays "don't wait").
        seconds = math.ceil(wait) if wait > 0 else 0
        async with self._lock:
            await self._watch(queue)
            async with asyncio.timeout(seconds + TIMEOUT):
                jobs = await self._reserve_many(seconds, max)
                await self._delete_many([i for i, _ in jobs])
            return [body for _, body in jobs]

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        # The beanstalkd worker loop (greenstalk's reserve() then delete()): one job per round trip each way;
        # with -f 0 the delete's DELETED comes after its binlog fsync.
        deadline = time.perf_counter() + seconds
        taken = 0
        async with self._lock:
            await self._watch(queue)
            while taken < count and time.perf_counter() < deadline:
                async with asyncio.timeout(TIMEOUT):
                    jobs = await self._reserve_many(1, 1)
                    if jobs:
                        await self._delete_many([jobs[0][0]])
                        taken += 1
        return taken
