"""One broker owns its store: a second broker, a restore over a live store, or a second opener in the same
process is refused at once and changes nothing; the lock dies with its process; the store is owner-only."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import replika
from replika_server.store import StoreInUse
from replika_server.store.lmdb_engine import LmdbConfig, LmdbStore
from tests.conftest import WAIT, ServerProcess
from tests.engines import LmdbOpener


def replika_cli(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    return subprocess.run(
        [sys.executable, "-m", "replika_server", *args], capture_output=True, text=True, timeout=WAIT, env=environ
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_broker_on_a_live_data_directory_exits_2_and_touches_nothing(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "data").start()
    try:
        with replika.Client(first.url) as client:
            client.publish("qq", b"a")
        before = digest(first.data_dir / "data.mdb")
        second = replika_cli("serve", "--data-dir", str(first.data_dir), "--port", "0", "--no-admin")
        assert second.returncode == 2
        assert f"the data directory {first.data_dir} is in use by pid {first.proc.pid} on host " in second.stderr
        assert digest(first.data_dir / "data.mdb") == before
        with replika.Client(first.url) as client:
            client.publish("qq", b"c")
            assert [m.payload for m in client.peek("qq", max=10)] == [b"a", b"c"]
    finally:
        first.stop()


async def test_a_second_store_in_the_same_process_is_refused_until_the_first_closes(open_lmdb: LmdbOpener) -> None:
    first = await open_lmdb()
    with pytest.raises(StoreInUse, match=f"in use by pid {os.getpid()} on host "):
        await LmdbStore.open(LmdbConfig(path=open_lmdb.path))
    await first.close()
    await open_lmdb()  # the lock went with the first store


def test_kill_9_releases_the_lock(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data").start()
    try:
        with replika.Client(proc.url) as client:
            client.publish("q", b"survives")
        proc.kill()  # no chance to unlock: the kernel drops the flock with the process
        proc.start()
        with replika.Client(proc.url) as client:
            assert [m.payload for m in client.peek("q")] == [b"survives"]
    finally:
        proc.stop()


def test_restore_refuses_a_live_data_directory_and_an_existing_store(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    live = ServerProcess(tmp_path / "live" / "data").start()
    backup_dir = tmp_path / "backup"
    try:
        with replika.Client(live.url) as client:
            client.publish("q", b"in the backup")
        assert replika_cli("backup", str(backup_dir), "--data-dir", str(live.data_dir)).returncode == 0
        with replika.Client(live.url) as client:
            client.publish("q", b"after the backup")
        before = digest(live.data_dir / "data.mdb")
        refused = replika_cli("restore", str(backup_dir), "--data-dir", str(live.data_dir), "--force")
        assert refused.returncode == 2
        assert f"the data directory {live.data_dir} is in use by pid {live.proc.pid}" in refused.stderr
        assert digest(live.data_dir / "data.mdb") == before
    finally:
        live.stop()

    # Stopped now, but it holds a store: only --force replaces it.
    kept = replika_cli("restore", str(backup_dir), "--data-dir", str(live.data_dir))
    assert kept.returncode == 2 and "already holds a store; --force replaces it" in kept.stderr
    assert digest(live.data_dir / "data.mdb") == before
    done = replika_cli("restore", str(backup_dir), "--data-dir", str(live.data_dir), "--force")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((live.data_dir / "data.mdb").stat().st_mode) == 0o600
    live.start()
    try:
        with replika.Client(live.url) as client:
            assert [m.payload for m in client.peek("q", max=10)] == [b"in the backup"]
    finally:
        live.stop()

    fresh = tmp_path / "fresh"
    done = replika_cli("restore", str(backup_dir), "--data-dir", str(fresh))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert sorted(os.listdir(fresh)) == ["data.mdb", "replika.lock"]
    missing = replika_cli("restore", str(tmp_path / "no-backup"), "--data-dir", str(tmp_path / "x"))
    assert missing.returncode == 1 and "no backup in" in missing.stderr


async def test_the_store_is_owner_only(open_lmdb: LmdbOpener) -> None:
    store = await open_lmdb()
    await store.close()
    path = open_lmdb.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert files == {"data.mdb": 0o600, "lock.mdb": 0o600, "replika.lock": 0o600}

    # A store an older version left readable to others is tightened when opened.
    for name in files:
        (path / name).chmod(0o644)
    await open_lmdb()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == files
