"""Storage engines behind one small interface (:class:`Store`). The network never reaches this package.

:func:`open` chooses the engine from a ``--store`` URL: a plain path or ``lmdb:///path`` is the embedded LMDB
engine (one broker process owns the directory). :func:`backup` and :func:`restore` work on an engine's files from
another process, beside a broker that keeps serving; an engine without them says what to use instead.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from replika_server.store._lock import StoreInUse
from replika_server.store.base import (
    MAX_QUEUE_NAME,
    SYSTEM_CLOCK,
    VIEW_THRESHOLD,
    Ack,
    BackupError,
    BackupResult,
    BatchResult,
    Bind,
    Clock,
    DeadLetterReason,
    Declare,
    DeleteQueue,
    Delivery,
    EventKind,
    Expire,
    Fetch,
    History,
    HistoryEvent,
    HistoryList,
    HistoryOptions,
    MessageHistory,
    Nack,
    Op,
    Operation,
    Peek,
    Peeked,
    Publish,
    Published,
    PublishTopic,
    Purge,
    QueueOptions,
    QueueStats,
    Redrive,
    Reject,
    Release,
    Result,
    Settle,
    Settled,
    StaleReason,
    Stats,
    Store,
    StoreCode,
    StoreError,
    StoreExists,
    StoreOptions,
    Touch,
    Unbind,
    is_valid_pattern,
    is_valid_queue_name,
)

__all__ = [
    "MAX_QUEUE_NAME",
    "SYSTEM_CLOCK",
    "VIEW_THRESHOLD",
    "Ack",
    "BackupError",
    "BackupResult",
    "BatchResult",
    "Bind",
    "Clock",
    "DeadLetterReason",
    "Declare",
    "DeleteQueue",
    "Delivery",
    "EventKind",
    "Expire",
    "Fetch",
    "History",
    "HistoryEvent",
    "HistoryList",
    "HistoryOptions",
    "MessageHistory",
    "Nack",
    "Op",
    "Operation",
    "Peek",
    "Peeked",
    "Publish",
    "PublishTopic",
    "Published",
    "Purge",
    "QueueOptions",
    "QueueStats",
    "Redrive",
    "Reject",
    "Release",
    "Result",
    "Settle",
    "Settled",
    "StaleReason",
    "Stats",
    "Store",
    "StoreCode",
    "StoreError",
    "StoreExists",
    "StoreInUse",
    "StoreOptions",
    "StoreUrlError",
    "Touch",
    "Unbind",
    "backup",
    "engine_of",
    "is_valid_pattern",
    "is_valid_queue_name",
    "open",
    "restore",
]

_POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreUrlError(ValueError):
    """A ``--store`` value that names no engine this broker has."""


def engine_of(url: str | Path) -> tuple[str, str]:
    """(engine, its address): ("lmdb", directory) or ("postgresql", libpq URL), or :class:`StoreUrlError`."""
    text = str(url)
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if not scheme:
        if not text:
            raise StoreUrlError("the store is empty: give a directory, lmdb:///path or postgresql://...")
        return "lmdb", text
    if scheme == "lmdb":
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise StoreUrlError(f"{text!r}: an LMDB store is lmdb:///absolute/path (or a plain path)")
        return "lmdb", urllib.parse.unquote(parts.path)
    if scheme in _POSTGRES_SCHEMES:
        return "postgresql", text
    raise StoreUrlError(f"unknown store {text!r}: give a directory, lmdb:///path or postgresql://...")


async def open(url: str | Path, options: StoreOptions | None = None) -> Store:
    """Open (creating if needed) the store ``url`` names, recovered and ready for :meth:`Store.execute`."""
    engine, where = engine_of(url)
    options = options or StoreOptions()
    if engine == "lmdb":
        from replika_server.store.lmdb_engine import LmdbConfig, LmdbStore

        return await LmdbStore.open(LmdbConfig.of(Path(where), options))
    try:
        from replika_server.store.pg_engine import PgStore
    except ImportError as exc:  # psycopg is an extra: pip install 'replika[postgresql]'
        raise StoreUrlError(f"the PostgreSQL engine needs psycopg: pip install 'replika[postgresql]' ({exc})") from None
    return await PgStore.open(where, options)


def backup(url: str | Path, dest: Path) -> BackupResult:
    """Write a consistent copy of the store ``url`` names to the new directory ``dest``, beside a broker that
    keeps serving it. :class:`BackupError` says why not."""
    engine, where = engine_of(url)
    if engine == "lmdb":
        from replika_server.store.lmdb_backup import hot_copy

        return hot_copy(Path(where), dest)
    raise BackupError(
        "a PostgreSQL store is backed up with PostgreSQL's own tools, not replika backup: pg_dump for a copy of "
        "the replika_* tables, pg_basebackup with WAL archiving (or your provider's snapshots) for point-in-time "
        "recovery"
    )


def restore(src: Path, url: str | Path, *, force: bool = False) -> BackupResult:
    """Make the backup in ``src`` the store ``url`` names; :class:`StoreInUse` while a broker serves it,
    :class:`StoreExists` if it holds a store and not ``force``."""
    engine, where = engine_of(url)
    if engine == "lmdb":
        from replika_server.store.lmdb_backup import restore as restore_lmdb

        return restore_lmdb(src, Path(where), force=force)
    raise BackupError(
        "a PostgreSQL store is restored with PostgreSQL's own tools (pg_restore, or a base backup and its WAL), "
        "not replika restore"
    )
