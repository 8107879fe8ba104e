"""The PostgreSQL test cluster of tests/pg.py is what the engine's tests need (issue 15): a real server, not
running as root, on 127.0.0.1 only, with fsync on, whose commits another connection sees."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from tests.pg import PG_USER, PostgresServer

pytestmark = pytest.mark.postgres


async def test_cluster_is_local_durable_and_not_root(postgres_server: PostgresServer) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as conn:
        settings = {}
        for name in ("fsync", "listen_addresses", "synchronous_commit"):
            row = await (await conn.execute(f"SHOW {name}")).fetchone()
            assert row is not None
            settings[name] = row[0]
        assert settings == {"fsync": "on", "listen_addresses": "127.0.0.1", "synchronous_commit": "on"}
        row = await (await conn.execute("SELECT pg_backend_pid(), current_user")).fetchone()
        assert row is not None
        pid, role = row
    assert role == PG_USER
    # The backend serving us is a process of the cluster: its owner is the cluster's user, never root.
    assert os.stat(Path("/proc") / str(pid)).st_uid != 0
    assert (postgres_server.datadir / "PG_VERSION").exists()


async def test_a_commit_is_seen_by_another_connection(postgres_server: PostgresServer) -> None:
    url = postgres_server.url
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute("DROP SCHEMA IF EXISTS cluster_check CASCADE")
        await admin.execute("CREATE SCHEMA cluster_check")
    try:
        async with await psycopg.AsyncConnection.connect(url) as writer:
            await writer.execute("CREATE TABLE cluster_check.t (v int)")
            await writer.execute("INSERT INTO cluster_check.t VALUES (1), (2)")
            async with await psycopg.AsyncConnection.connect(url) as reader:
                # Not yet committed: the other connection sees no table at all.
                with pytest.raises(psycopg.errors.UndefinedTable):
                    await reader.execute("SELECT count(*) FROM cluster_check.t")
                await reader.rollback()
                await writer.commit()
                row = await (await reader.execute("SELECT sum(v) FROM cluster_check.t")).fetchone()
                assert row == (3,)
    finally:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            await admin.execute("DROP SCHEMA cluster_check CASCADE")
