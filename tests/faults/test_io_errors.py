"""I/O errors: fdatasync or pwrite fail with EIO (libfiu) while the broker is under load.

The broker must answer the batch whose commit failed with ``STORE_FAILED``, log it, refuse every later write
even once the disk works again (a retried fsync may succeed over pages the kernel already dropped:
"fsyncgate"), exit with code 74 after answering what was in flight, and reopen on restart with every confirmed
publish there. Each fault strikes once and heals: a broker that retried, or carried on after reloading its state
(as this one did before), would confirm later publishes, and these tests would fail.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import lmdb
import pytest

import replika
from replika_server.cli_client import EXIT_STORE_FAILED
from tests.conftest import serving
from tests.faults.fiu import FiuBroker
from tests.faults.ledger import Ledger, drain, run_load

pytestmark = pytest.mark.faults

QUEUE = "io"


def _critical_lines(log: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "critical"]


@pytest.mark.parametrize(
    ("point", "flags"),
    [
        ("posix/io/sync/fdatasync", ()),
        ("posix/io/rw/pwrite", ()),
        # relaxed: the failed sync is the background one; the writes after it are refused all the same
        ("posix/io/sync/fdatasync", ("--durability", "relaxed", "--sync-interval", "0.05")),
    ],
    ids=["fdatasync", "pwrite", "relaxed-fdatasync"],
)
async def test_an_io_error_fails_the_store_and_confirms_nothing_after(
    tmp_path: Path, point: str, flags: tuple[str, ...]
) -> None:
    broker = FiuBroker(tmp_path / "data", "--no-admin", *flags).start()
    ledger = Ledger()
    try:

        async def fault() -> int:
            broker.fail(point, once=True)
            return await asyncio.to_thread(broker.wait_exit)

        code = await run_load(broker.url, QUEUE, "io", ledger, fault, after=300, rng=random.Random(7))
    finally:
        broker.stop()
    assert code == EXIT_STORE_FAILED, broker.log.read_text()[-3000:]
    assert ledger.refused.get("STORE_FAILED"), ledger.refused
    events = [line["event"] for line in _critical_lines(broker.log)]
    assert "store_failed" in events and "exiting" in events, events

    restarted = broker.plain()  # the store opens, at its last durable commit
    try:
        stored = await drain(restarted.url, QUEUE)
    finally:
        restarted.stop()
    assert not ledger.violations(stored), ledger.violations(stored)
    assert ledger.confirmed, "the load confirmed nothing before the fault: it proved nothing"


async def test_after_a_failed_commit_writes_stay_refused_and_reads_still_work(tmp_path: Path) -> None:
    # The same fault in-process, once, to look closer: no second commit is tried, not even after the fault is
    # gone, and stats and peek show the last durable commit.
    async with serving(tmp_path / "data") as running, replika.AsyncClient(running.url) as client:
        await client.publish(QUEUE, b"kept")
        store = running.server.broker._store
        commits = 0

        def fail_once(writes: object) -> None:
            nonlocal commits
            commits += 1
            if commits == 1:
                raise lmdb.Error("mdb_txn_commit: Input/output error")

        store._commit_sync = fail_once  # type: ignore[attr-defined]
        with pytest.raises(replika.StoreFailed):
            await client.publish(QUEUE, b"never confirmed")
        assert running.server.broker.failed.is_set()
        for attempt in (client.publish(QUEUE, b"after"), client.fetch(QUEUE), client.purge(QUEUE)):
            with pytest.raises(replika.StoreFailed):
                await attempt
        assert commits == 1
        assert (await client.stats(QUEUE))["ready"] == 1
        assert [m.payload for m in await client.peek(QUEUE, max=10)] == [b"kept"]
