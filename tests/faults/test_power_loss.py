"""Power loss: the broker's data directory on the lazy filesystem, the power cut at random moments under load.

A kill -9 leaves the kernel's page cache in place; a power cut does not, and only what was synced survives it.
Each round runs publishers and consumers, drops every write not yet synced, kills the broker, remounts, and
restarts it on what was durable: every confirmed publish must be there unless its ack was confirmed, no
confirmed ack may come back, and the store must open every time. The same rounds against ``--durability
relaxed`` (which confirms before syncing) must find losses, or the rig proves nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.ledger import Ledger, drain, run_load
from tests.faults.rig import LazyMount, PowerRig, power_rig

pytestmark = pytest.mark.faults

ROUNDS = 20
QUEUE = "power"


def _seed() -> int:
    return int(os.environ.get("REPLIKA_FAULT_SEED", time.time_ns() % 2**32))


async def _round(rig: PowerRig, ledger: Ledger, n: int, rng: random.Random, consumers: int = 2) -> dict[str, object]:
    """One load, one power cut, one restart; returns the cut's report with the violations found after it."""
    broker = rig.broker or rig.start()
    cut = lambda: asyncio.to_thread(rig.cut_power)  # noqa: E731 - run_load awaits it at the random moment
    report = await run_load(
        broker.url, QUEUE, f"r{n}", ledger, cut, after=rng.randint(1, 400), rng=rng, consumers=consumers
    )
    broker = rig.start()  # the store must open after every cut
    stored = await drain(broker.url, QUEUE)
    violations = ledger.violations(stored)
    ledger.settle(stored)
    return {**report, "violations": violations}  # type: ignore[dict-item]


async def test_power_loss_loses_nothing_confirmed(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    ledger = Ledger()
    dropped = 0
    with power_rig(tmp_path) as rig:
        for n in range(ROUNDS):
            result = await _round(rig, ledger, n, rng)
            assert not result["violations"], f"seed {seed}, round {n}: {result}"
            dropped += int(result["dropped_writes"])  # type: ignore[call-overload]
    assert len(ledger.confirmed) > ROUNDS, f"seed {seed}: too little load to prove anything: {ledger.refused}"
    print(f"seed {seed}: {ROUNDS} cuts, {len(ledger.confirmed)} confirmed, {dropped} unsynced writes dropped")


async def test_power_loss_catches_a_broker_that_confirms_before_syncing(tmp_path: Path) -> None:
    # relaxed durability confirms once LMDB has written to the OS and syncs every --sync-interval (here never
    # within the test): exactly the bug a power-loss test exists to find, so it must find it. No consumers: a
    # cut that takes the publishes takes their acks with them, and a drained queue would show nothing lost.
    rng = random.Random(_seed())
    ledger = Ledger()
    with power_rig(tmp_path, "--durability", "relaxed", "--sync-interval", "600") as rig:
        result = await _round(rig, ledger, 0, rng, consumers=0)
    assert result["dropped_writes"], result
    assert result["violations"].get("lost"), result  # type: ignore[attr-defined]


def test_the_lazy_filesystem_drops_exactly_the_unsynced_writes(tmp_path: Path) -> None:
    mount = LazyMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "ctl", tmp_path / "lazyfs.log")
    (tmp_path / "backing").mkdir()
    mount.mount()
    try:
        synced, lost = mount.mountpoint / "synced", mount.mountpoint / "lost"
        fd = os.open(synced, os.O_CREAT | os.O_RDWR)
        os.write(fd, b"durable")
        os.fdatasync(fd)
        os.pwrite(fd, b"DUR", 0)  # overwritten in place, never synced
        os.pwrite(fd, b" and more", 7)  # grows the file, never synced
        os.close(fd)
        lost.write_bytes(b"never synced")
        assert synced.read_bytes() == b"DURable and more"
        # flock works between processes on the mount (the kernel handles it), as on a local disk
        with synced.open("rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            other = f"import fcntl; fcntl.flock(open({str(synced)!r}, 'rb'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
            assert subprocess.run([sys.executable, "-c", other], capture_output=True).returncode != 0
        assert mount.command("stats")["pending"] == 3
        report = mount.command("crash")
        assert report["dropped_writes"] == 3, report
        with pytest.raises(OSError):
            lost.write_bytes(b"after the power went")
        mount.unmount()
        mount.mount()  # the machine back on: a new mount, no page cache
        assert synced.read_bytes() == b"durable"
        assert lost.read_bytes() == b""  # created (directory entries are durable at once), its data lost
    finally:
        mount.force_unmount()
