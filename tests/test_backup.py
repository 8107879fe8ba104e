"""``replika backup``: a hot copy of a serving broker's store, which a new broker then serves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import replika
from tests.conftest import WAIT, ServerProcess

BATCH = 50


def payload(seq: int) -> bytes:
    """The seq-th message of the checked queue (ids count from 1, so its id is seq + 1)."""
    return b"load-%08d-" % seq + bytes([seq % 251]) * 1000


def backup(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    return subprocess.run(
        [sys.executable, "-m", "replika_server", "backup", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=environ,
    )


class Load:
    """Publishes to ``load`` without pause, and churns ``churn`` (publish then ack) so that LMDB frees and reuses
    pages while the copy reads; stops when told, or by itself after WAIT seconds."""

    def __init__(self, url: str, first_seq: int) -> None:
        self.url = url
        self.seq = first_seq
        self.confirmed = first_seq  # messages of `load` whose publish was confirmed
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(f,)) for f in (self._publish, self._churn)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        assert not self.errors, self.errors

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:
            self.errors.append(exc)

    def _running(self, started: float) -> bool:
        return not self.stop.is_set() and time.monotonic() - started < WAIT

    def _publish(self) -> None:
        started = time.monotonic()
        with replika.Client(self.url) as client:
            while self._running(started):
                ids = client.publish_many("load", [payload(self.seq + i) for i in range(BATCH)])
                assert ids == list(range(self.seq + 1, self.seq + BATCH + 1))
                self.seq += BATCH
                self.confirmed = self.seq  # one int assignment: the test thread reads a consistent value

    def _churn(self) -> None:
        started = time.monotonic()
        with replika.Client(self.url) as client:
            while self._running(started):
                client.publish_many("churn", [b"c" * 4000] * 20)
                client.ack(client.fetch("churn", max=20))


def test_a_backup_under_load_restores_every_confirmed_message(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    live = ServerProcess(tmp_path / "live" / "data").start()
    dest = tmp_path / "restore" / "data"
    try:
        prefill = 20_000  # ~20 MiB, so that the copy takes a while
        with replika.Client(live.url) as client:
            for start in range(0, prefill, 1000):
                client.publish_many("load", [payload(s) for s in range(start, start + 1000)])
        with Load(live.url, prefill) as load:
            deadline = time.monotonic() + WAIT
            while load.confirmed < prefill + 10 * BATCH:  # both writers are going
                assert time.monotonic() < deadline and not load.errors, load.errors
                time.sleep(0.01)  # the load runs in other threads: nothing to await
            confirmed_before = load.confirmed
            result = backup(str(dest), "--data-dir", str(live.data_dir))
            confirmed_after = load.confirmed
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{dest}: ") and result.stderr == ""
        assert confirmed_after > confirmed_before, "no publish was confirmed while the backup ran"
    finally:
        live.stop()

    assert sorted(os.listdir(dest)) == ["data.mdb"]
    try:
        from lmdb.verify import verify  # py-lmdb's structural checker, where the installed version has one
    except ImportError:
        pass
    else:
        verify(str(dest))

    restored = ServerProcess(dest).start()
    try:
        with replika.Client(restored.url) as client:
            got: list[replika.SyncMessage] = []
            while batch := client.fetch("load", max=5000, wait=0):
                got += batch
            ids = [m.id for m in got]
            # One committed snapshot: every message confirmed before the backup began, then an unbroken run
            # of later ones, and nothing after a gap or half-written.
            assert ids == list(range(1, len(ids) + 1))
            assert confirmed_before <= len(ids) <= load.confirmed
            assert all(m.payload == payload(m.id - 1) and m.attempts == 1 for m in got)
            client.ack(got)
            churn = client.stats("churn")
            assert churn["total"] == churn["ready"]  # leases were never stored: all ready again
            assert client.publish("load", b"after restore") == len(ids) + 1
    finally:
        restored.stop()


def test_backup_refuses_a_missing_store_and_a_used_destination(tmp_path: Path) -> None:
    result = backup(str(tmp_path / "copy"), "--data-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 1
    assert result.stderr.startswith("replika: backup failed: no store in ") and result.stdout == ""
    assert not (tmp_path / "copy").exists()

    proc = ServerProcess(tmp_path / "data").start()
    try:
        with replika.Client(proc.url) as client:
            client.publish("q", b"kept")
        used = tmp_path / "used"
        used.mkdir()
        (used / "something").write_text("x")
        result = backup(str(used), "--data-dir", str(proc.data_dir))
        assert result.returncode == 1 and "not an empty directory" in result.stderr
        # An empty directory is fine, and so is a data_dir named by a serve config file.
        empty = tmp_path / "empty"
        empty.mkdir()
        config = tmp_path / "replika.toml"
        config.write_text('data_dir = "data"\n')
        result = backup(str(empty), "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial copy left
    finally:
        proc.stop()
    restored = ServerProcess(empty).start()
    try:
        with replika.Client(restored.url) as client:
            assert [m.payload for m in client.fetch("q", max=10)] == [b"kept"]
    finally:
        restored.stop()


@pytest.mark.parametrize("args", [(), ("a", "b"), ("x", "--frobnicate")])
def test_backup_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert backup(*args).returncode == 2
