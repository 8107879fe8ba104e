"""A full disk: the data directory on a small tmpfs, filled by publishers, with and without --max-store-size.

Publishers get ``STORE_FULL`` (never ``STORE_FAILED``: a full disk is not a failing one, although LMDB reports a
write it cut short as EIO), nothing confirmed is lost, and the broker takes publishes again by itself once there
is room: when the operator frees disk space, or, under --max-store-size, when consumers drain the store.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import replika
from tests.conftest import restart, serving
from tests.faults.ledger import drain

pytestmark = pytest.mark.faults

MiB = 1024 * 1024
DISK = 24 * MiB
BALLAST = 6 * MiB  # another file on the same disk, which the operator deletes to make room
PAYLOAD = 16 * 1024
QUEUE = "disk"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK-byte tmpfs mounted in tmp_path, holding a BALLAST-byte file."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "ballast").write_bytes(os.urandom(BALLAST))
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


async def _fill(client: replika.AsyncClient, confirmed: list[bytes]) -> None:
    """Publish batches until the broker says STORE_FULL (and check it keeps saying so)."""
    for i in range(DISK // PAYLOAD):
        batch = [f"{i}.{j}:".encode().ljust(PAYLOAD, b"x") for j in range(8)]
        try:
            await client.publish_many(QUEUE, batch)
        except replika.StoreFull:
            break
        confirmed += batch
    else:
        pytest.fail("the store never filled up")
    with pytest.raises(replika.StoreFull):
        await client.publish(QUEUE, b"one more")


@pytest.mark.parametrize(
    ("config", "room"),
    [
        pytest.param({}, "free disk", id="disk-full-no-limit"),
        pytest.param({"max_store_size": 64 * MiB}, "free disk", id="disk-full-below-the-limit"),
        pytest.param({"max_store_size": 4 * MiB}, "drain", id="limit-reached-on-a-small-disk"),
    ],
)
async def test_a_full_store_refuses_publishes_keeps_what_it_confirmed_and_recovers(
    small_disk: Path, config: dict[str, int], room: str
) -> None:
    confirmed: list[bytes] = []
    acked: set[bytes] = set()
    async with serving(small_disk / "data", **config) as running:
        async with replika.AsyncClient(running.url) as client:
            await _fill(client, confirmed)
            assert (await client.stats(QUEUE))["ready"] == len(confirmed)  # reads go on
            if room == "free disk":
                (small_disk / "ballast").unlink()
            else:  # consumers drain most of it; their acks fit in the reserve beyond max_store_size
                while len(acked) < len(confirmed) - 8:
                    msgs = await client.fetch(QUEUE, max=64)
                    await client.ack(msgs, wait=True)  # counted as acked only once durable
                    acked.update(m.payload for m in msgs)
            after = [f"after:{j}".encode().ljust(PAYLOAD, b"y") for j in range(8)]
            await client.publish_many(QUEUE, after)  # the broker noticed the room by itself
            confirmed += after
        assert not running.server.broker.failed.is_set(), "a full disk failed the store"
        running = await restart(running, **config)
        stored = await drain(running.url, QUEUE)
    missing = set(confirmed) - acked - stored
    assert not missing, f"{len(missing)} confirmed messages lost"
    assert not stored & acked, "acked messages came back"
