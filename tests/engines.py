"""The storage engines the store contract suite runs against, and how a test opens their stores.

The contract suite (tests/test_store*.py, tests/test_state_machine.py) sees only the :class:`Store` interface. It
reaches an engine through the ``store_space`` fixture of tests/conftest.py, which runs every one of those tests
once per entry of :data:`ENGINES`. This module and conftest are the only places of the suite that name an engine.

Adding an engine is one entry in :data:`ENGINES`: its ``--store`` scheme, and a function that gives a test its
:class:`StoreSpace` (fresh store URLs, cleaned up when the test ends). A server the engine needs (a PostgreSQL
cluster, say) is a session-scoped fixture in conftest that the function pulls in with
``request.getfixturevalue(...)``, so it starts once per run and only when a test of that engine runs; each
:meth:`StoreSpace.new` then makes a database or schema of its own on it. For example::

    @contextlib.contextmanager
    def postgres_spaces(request: pytest.FixtureRequest) -> Iterator[StoreSpace]:
        server = request.getfixturevalue("postgres_server")  # session-scoped, in conftest
        with PostgresSpace(server.url) as space:  # new(): CREATE SCHEMA ...; exit: DROP the schemas it made
            yield space

    ENGINES = {"lmdb": lmdb_spaces, "postgresql": postgres_spaces}
"""

from __future__ import annotations

import contextlib
import shutil
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import psycopg
import pytest
from psycopg import sql

from replika_server import store as stores
from replika_server.store import Store, StoreOptions
from replika_server.store._records import KEY, VALUE_HEAD_SIZE
from replika_server.store.lmdb_engine import LmdbConfig, LmdbStore
from replika_server.store.pg_engine import PgStore
from tests.clock import ManualClock
from tests.pg import PostgresServer

__all__ = [
    "ENGINES",
    "LmdbOpener",
    "LmdbSpace",
    "Opener",
    "Options",
    "PostgresSpace",
    "SpaceFactory",
    "StoreSpace",
]


class StoreSpace(Protocol):
    """Where one test's stores of one engine live."""

    def new(self) -> str:
        """The ``--store`` URL of a fresh, empty store that no test has used."""
        ...

    def drop(self, url: str) -> None:
        """Remove the closed store at ``url`` with all it holds (for tests that make many stores, such as the
        hypothesis ones: one per example). What is not dropped is removed when the test ends."""
        ...

    def holdings(self, store: Store) -> dict[str, tuple[int, int]]:
        """What the open ``store`` holds, counted the slow way from its storage and not from its own counters:
        queue name -> (messages, payload plus packed headers bytes). Messages that belong to no queue are counted
        under a name that is no queue's, so that a check finds them."""
        ...


#: How a test gets its :class:`StoreSpace` of an engine: called with the test's request (to pull in a session
#: fixture with ``request.getfixturevalue``); the space lives until the context exits, at the test's end.
SpaceFactory = Callable[[pytest.FixtureRequest], contextlib.AbstractContextManager[StoreSpace]]


class Options(TypedDict, total=False):
    """:class:`StoreOptions` a test may set when it opens a store (the clock is always the test's)."""

    durable: bool
    max_size: int
    sync_interval: float
    max_queues: int
    default_max_length: int | None
    default_max_bytes: int | None


class Opener:
    """Opens stores at one URL (through :func:`replika_server.store.open`), all on one manual clock, so that a
    reopened store sees the time its predecessor saw; :meth:`close` closes every store it opened."""

    def __init__(self, url: str, clock: ManualClock | None = None) -> None:
        self.url = url
        self.clock = clock if clock is not None else ManualClock()
        self.opened: list[Store] = []

    async def __call__(self, **options: Unpack[Options]) -> Store:
        store = await stores.open(self.url, StoreOptions(clock=self.clock, **options))
        self.opened.append(store)
        return store

    async def reopen(self, store: Store, **options: Unpack[Options]) -> Store:
        """Close ``store`` and open the same URL again, as a restarted broker would."""
        await store.close()
        return await self(**options)

    async def close(self) -> None:
        for store in self.opened:
            await store.close()  # idempotent: a store the test closed already is fine


# ----------------------------------------------------------------------------------------------- LMDB
def lmdb_path(url: str) -> Path:
    engine, where = stores.engine_of(url)
    assert engine == "lmdb", url
    return Path(where)


class LmdbSpace:
    """LMDB stores, each a directory under ``root`` (the test's tmp_path)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made = 0

    def new(self) -> str:
        self._made += 1
        return "lmdb://" + urllib.parse.quote(str(self.root / f"store-{self._made}"))

    def drop(self, url: str) -> None:
        shutil.rmtree(lmdb_path(url), ignore_errors=True)

    def holdings(self, store: Store) -> dict[str, tuple[int, int]]:
        assert isinstance(store, LmdbStore)
        out: dict[str, tuple[int, int]] = {}
        with store._env.begin(db=store._msgs_db) as txn:
            for key, value in txn.cursor():
                qnum = KEY.unpack(key)[0]
                q = store._by_qnum.get(qnum)  # every storage prefix (priority lanes, the side prefix) of a queue
                name = q.name if q is not None else f"<prefix {qnum} of no queue>"
                n, size = out.get(name, (0, 0))
                out[name] = (n + 1, size + len(value) - VALUE_HEAD_SIZE)
        return out


@contextlib.contextmanager
def lmdb_spaces(request: pytest.FixtureRequest) -> Iterator[StoreSpace]:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    yield LmdbSpace(tmp_path / "stores")  # pytest removes old tmp_paths itself


class LmdbOpener:
    """For the tests of the LMDB engine itself: opens :class:`LmdbStore` at one path with any :class:`LmdbConfig`
    settings, on one manual clock; :meth:`close` closes every store it opened."""

    def __init__(self, path: Path, clock: ManualClock | None = None) -> None:
        self.path = path
        self.url = "lmdb://" + urllib.parse.quote(str(path))
        self.clock = clock if clock is not None else ManualClock()
        self.opened: list[LmdbStore] = []

    async def __call__(self, **config: Any) -> LmdbStore:
        store = await LmdbStore.open(LmdbConfig(path=self.path, clock=self.clock, **config))
        self.opened.append(store)
        return store

    async def reopen(self, store: Store, **config: Any) -> LmdbStore:
        await store.close()
        return await self(**config)

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


# ----------------------------------------------------------------------------------------------- PostgreSQL
class PostgresSpace:
    """PostgreSQL stores, each a schema of its own on the session's cluster (``search_path`` in the URL), dropped
    when the test ends."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._made: list[str] = []

    def new(self) -> str:
        schema = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self._made.append(schema)
        return self.server.url + "?options=" + urllib.parse.quote(f"-csearch_path={schema}")

    @staticmethod
    def schema_of(url: str) -> str:
        options = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["options"][0]
        return options.removeprefix("-csearch_path=")

    def drop(self, url: str) -> None:
        schema = self.schema_of(url)
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        if schema in self._made:
            self._made.remove(schema)

    def holdings(self, store: Store) -> dict[str, tuple[int, int]]:
        assert isinstance(store, PgStore)
        out: dict[str, tuple[int, int]] = {}
        with psycopg.connect(store._url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT coalesce(q.name, '<no queue: ' || m.queue || '>'), count(*), sum(m.size) "
                "FROM replika_messages m LEFT JOIN replika_queues q ON q.name = m.queue GROUP BY 1"
            ).fetchall()
        for name, n, size in rows:
            out[str(name)] = (int(n), int(size))
        return out

    def close(self) -> None:
        for schema in list(self._made):
            with psycopg.connect(self.server.url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        self._made.clear()


@contextlib.contextmanager
def postgres_spaces(request: pytest.FixtureRequest) -> Iterator[StoreSpace]:
    server: PostgresServer = request.getfixturevalue("postgres_server")  # session-scoped: tests/pg.py
    space = PostgresSpace(server)
    try:
        yield space
    finally:
        space.close()


# ----------------------------------------------------------------------------------------------- the engines
#: Every engine the contract suite runs against: its ``--store`` scheme -> how a test gets its stores.
ENGINES: dict[str, SpaceFactory] = {
    "lmdb": lmdb_spaces,
    "postgresql": postgres_spaces,
}
