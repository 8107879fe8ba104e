"""The pgmq-style baseline: Python workers on PostgreSQL directly, with the same driver (psycopg 3) and the same
server as Replika's PostgreSQL engine, the way pgmq and most hand-written PostgreSQL queues work. A queue is a
table; publishing is ``INSERT ... SELECT unnest(...)`` in one transaction; consuming claims a batch with
``FOR UPDATE SKIP LOCKED`` (setting a visibility timeout) in one transaction, then deletes it at ack in another.
Every transaction commits with the server's ``synchronous_commit`` (on), as Replika's do. Array parameters go
in binary (``%b``), as the engine's do: psycopg builds a text array in Python, hex-escaping each bytea.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
from psycopg import sql

from bench.drivers.base import Driver

__all__ = ["PgmqDriver"]

#: Seconds a claimed message stays invisible to other workers (pgmq's ``vt``).
VISIBILITY = 30.0


class PgmqDriver(Driver):
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    @property
    def _c(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        assert self._conn is not None
        return self._conn

    async def connect(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    @staticmethod
    def _table(queue: str) -> sql.Identifier:
        return sql.Identifier(f"pgmq_{queue.replace('-', '_')}")

    async def reset(self, queue: str) -> None:
        t = self._table(queue)
        await self._c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
        await self._c.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, vt double precision NOT NULL DEFAULT 0, "
                "read_ct integer NOT NULL DEFAULT 0, message bytea NOT NULL)"
            ).format(t)
        )
        await self._c.execute(sql.SQL("CREATE INDEX ON {} (vt)").format(t))

    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        await self._c.execute(
            sql.SQL("INSERT INTO {} (message) SELECT unnest(%b::bytea[])").format(self._table(queue)), (payloads,)
        )

    async def publish_one(self, queue: str, payload: bytes) -> None:
        await self._c.execute(sql.SQL("INSERT INTO {} (message) VALUES (%s)").format(self._table(queue)), (payload,))

    async def _claim(self, queue: str, n: int) -> list[tuple[int, bytes]]:
        t = self._table(queue)
        now = time.time()
        cur = await self._c.execute(
            sql.SQL(
                "UPDATE {t} SET vt = %s, read_ct = read_ct + 1 WHERE id IN (SELECT id FROM {t} WHERE vt <= %s "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, message"
            ).format(t=t),
            (now + VISIBILITY, now, n),
        )
        rows = await cur.fetchall()
        rows.sort()
        return [(int(r[0]), bytes(r[1])) for r in rows]  # type: ignore[call-overload, arg-type]

    async def _delete(self, queue: str, ids: list[int]) -> None:
        await self._c.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%b::bigint[])").format(self._table(queue)), (ids,))

    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        deadline = time.perf_counter() + wait
        while True:
            rows = await self._claim(queue, max)
            if rows or time.perf_counter() >= deadline:
                break
            await asyncio.sleep(0.01)  # pgmq's read_with_poll: it polls, there is nothing to await
        if rows:
            await self._delete(queue, [i for i, _ in rows])
        return [m for _, m in rows]

    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        """pgmq's worker loop: read one, process, delete it."""
        deadline = time.perf_counter() + seconds
        taken = 0
        while taken < count and time.perf_counter() < deadline:
            rows = await self._claim(queue, 1)
            if not rows:
                break
            await self._delete(queue, [rows[0][0]])
            taken += 1
        return taken
