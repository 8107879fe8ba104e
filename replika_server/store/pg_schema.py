"""The PostgreSQL engine's tables, created and migrated at start under an advisory lock.

Every piece of queue state lives here, so that any number of brokers can serve the same queues: nothing a node
keeps in memory is needed by another (its per-queue event counters and its cached timer are its own). Times are
wall-clock unix seconds from the brokers' clocks (``double precision``), never the database's ``now()``: a lease a
node grants ends by the same clock that node and the others check it against, and the tests drive it by hand.

Tables (all prefixed ``replika_``, in the schema the URL's ``search_path`` names, ``public`` by default):

- ``schema``: one row, the schema version. A node refuses a database whose version is newer than it knows.
- ``queues``: per queue its options (JSON), the next message id, and its message count and bytes (payload plus
  packed headers, as ``max_bytes`` counts them). The row is the queue's lock: a publish takes it to assign
  consecutive ids, so two nodes publishing to one queue commit in id order.
- ``messages``: one row per message; ``state`` 0 ready, 1 leased, 2 delayed; the lease's ``token``, ``deadline``
  and holder (``node``, ``owner``: a connection of that node); ``due`` for a delayed one; ``expires_at`` the end of
  its TTL (its own or the queue's). Partial indexes serve the ready order (priority, then id), leases by
  deadline and by holder, delays by due time and TTLs by end.
- ``dedup``: dedup ids within their window. ``bindings``: topic patterns. ``nodes``: each running broker's
  heartbeat, so that the others release a dead node's leases before they would expire.
- ``history`` and ``history_msgs``: message history (see :mod:`._pg_history`).

The message table is a queue: rows are inserted and deleted at the same rate, so dead tuples pile up unless
vacuum keeps pace. Its autovacuum runs at 1% dead tuples (not PostgreSQL's 20%), without cost-based throttling,
and its pages are left 10% free so that a lease's update can stay on the page (HOT updates, no index churn).
"""

from __future__ import annotations

import psycopg

__all__ = ["QUEUES_LOCK_KEY", "SCHEMA_VERSION", "SchemaTooNew", "migrate"]

SCHEMA_VERSION = 1

#: The advisory lock key every node takes while it creates or migrates the schema (any 64-bit constant; this one
#: spells "replika" in ASCII), combined with the schema's name so that two schemas of one database do not wait
#: for each other.
LOCK_KEY = 0x7265706C696B61
#: The advisory lock a node takes, to the end of its batch's transaction, before it counts the queues to create
#: one: two nodes creating queues at once would otherwise both count ``max_queues - 1`` and both create one.
#: Paired with the schema's name like :data:`LOCK_KEY`; creating queues is rare, so serialising it costs nothing.
QUEUES_LOCK_KEY = (LOCK_KEY >> 32) + 1

_V1 = [
    """CREATE TABLE replika_queues (
        name text PRIMARY KEY,
        options jsonb NOT NULL,
        next_id bigint NOT NULL DEFAULT 1,
        count bigint NOT NULL DEFAULT 0,
        bytes bigint NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE replika_messages (
        queue text NOT NULL,
        id bigint NOT NULL,
        prio smallint NOT NULL DEFAULT 0,
        state smallint NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        token bigint NOT NULL DEFAULT 0,
        due double precision NOT NULL DEFAULT 0,
        deadline double precision NOT NULL DEFAULT 0,
        node bigint NOT NULL DEFAULT 0,
        owner bigint NOT NULL DEFAULT 0,
        published_at double precision NOT NULL,
        own_expiry double precision,
        expires_at double precision,
        size integer NOT NULL,
        payload bytea NOT NULL,
        headers bytea,
        PRIMARY KEY (queue, id)
    ) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
            autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0,
            autovacuum_analyze_scale_factor = 0.02)""",
    "CREATE INDEX replika_messages_ready ON replika_messages (queue, prio DESC, id) WHERE state = 0",
    "CREATE INDEX replika_messages_leased ON replika_messages (deadline) WHERE state = 1",
    "CREATE INDEX replika_messages_holder ON replika_messages (node, owner) WHERE state = 1",
    "CREATE INDEX replika_messages_delayed ON replika_messages (due) WHERE state = 2",
    "CREATE INDEX replika_messages_expiring ON replika_messages (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE replika_dedup (
        queue text NOT NULL,
        dedup_id text NOT NULL,
        seen_at double precision NOT NULL,
        message_id bigint NOT NULL,
        PRIMARY KEY (queue, dedup_id)
    )""",
    "CREATE INDEX replika_dedup_seen ON replika_dedup (seen_at)",
    """CREATE TABLE replika_bindings (
        queue text NOT NULL,
        pattern text NOT NULL,
        PRIMARY KEY (queue, pattern)
    )""",
    """CREATE TABLE replika_nodes (
        id bigint PRIMARY KEY,
        heartbeat double precision NOT NULL,
        started double precision NOT NULL,
        host text NOT NULL
    )""",
    "CREATE SEQUENCE replika_tokens",
    "CREATE SEQUENCE replika_history_seq",
    """CREATE TABLE replika_history_msgs (
        queue text NOT NULL,
        id bigint NOT NULL,
        first_seq bigint NOT NULL,
        published_at double precision NOT NULL,
        ended_at double precision,
        PRIMARY KEY (queue, id)
    )""",
    "CREATE INDEX replika_history_msgs_order ON replika_history_msgs (queue, first_seq)",
    "CREATE INDEX replika_history_msgs_ended ON replika_history_msgs (ended_at) WHERE ended_at IS NOT NULL",
    """CREATE TABLE replika_history (
        queue text NOT NULL,
        id bigint NOT NULL,
        seq bigint NOT NULL,
        at double precision NOT NULL,
        kind text NOT NULL,
        attempt integer NOT NULL,
        connection bigint NOT NULL,
        detail bytea,
        PRIMARY KEY (queue, id, seq)
    )""",
]

#: Statements taking a schema of version ``n - 1`` to ``n``, for n = 1, 2, ...
MIGRATIONS: list[list[str]] = [_V1]
assert len(MIGRATIONS) == SCHEMA_VERSION


class SchemaTooNew(Exception):
    """The database was migrated by a newer Replika than this one: starting would misread it."""


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """Create the tables, or bring them to :data:`SCHEMA_VERSION`, under the advisory lock (several nodes
    starting together: one migrates, the others wait and then find it done). The version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema())::int)", (LOCK_KEY >> 32,))
        await conn.execute("CREATE TABLE IF NOT EXISTS replika_schema (version integer NOT NULL)")
        row = await (await conn.execute("SELECT version FROM replika_schema")).fetchone()
        found = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database holds Replika schema version {found}; this broker knows up to {SCHEMA_VERSION}: "
                "upgrade the broker"
            )
        for statements in MIGRATIONS[found:]:
            for statement in statements:
                await conn.execute(statement)
        if row is None:
            await conn.execute("INSERT INTO replika_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif found < SCHEMA_VERSION:
            await conn.execute("UPDATE replika_schema SET version = %s", (SCHEMA_VERSION,))
    return found
