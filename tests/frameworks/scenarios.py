"""The framework tests, written once: each takes a :class:`Driver` (how to start a worker of that framework and
how to send it tasks) and runs real worker processes against a real ``replika serve``.

Every wait is bounded by ``WAIT`` and polls files or processes that other processes write or run: there is
nothing in this process to await.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import replika
from tests.conftest import WAIT, ServerProcess
from tests.frameworks import records

ROOT = Path(__file__).resolve().parent.parent.parent


class Worker:
    """A framework's worker command as a child process in its own session (so kill -9 reaches its children)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> set[int]:
        """The worker's process and its children (prefork pools, worker processes): its process group."""
        found = {self.proc.pid}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.proc.pid:  # the process group, after the name and the state
                    found.add(int(stat.parent.name))
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)

    def stop(self) -> int | None:
        """SIGTERM to the worker's main process (a warm shutdown: it stops its children itself), then SIGKILL if it
        is not gone within WAIT; the exit code of a clean stop."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived their parent

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Driver(Protocol):
    """What the scenarios need from one framework."""

    name: str

    def worker(self, url: str, queue: str, log: Path, records_file: Path, lease: float = 30.0) -> Worker: ...

    def send(
        self, url: str, queue: str, task: str, args: list[tuple[object, ...]], delay: float | None = None
    ) -> None: ...

    def dead_letter_queue(self, queue: str) -> str: ...


def worker_env(url: str, queue: str, records_file: Path, lease: float) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", C_FORCE_ROOT="1")
    env.update(
        REPLIKA_TEST_BROKER=url,
        REPLIKA_TEST_QUEUE=queue,
        REPLIKA_TEST_RECORDS=str(records_file),
        REPLIKA_TEST_LEASE=str(lease),
    )
    return env


def python() -> str:
    return sys.executable


def wait_until(check: Callable[[], bool], what: str, *workers: Worker, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {w.log.name}:\n{w.tail()}" for w in workers)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(0.02)  # the state is in other processes' files and queues: nothing to await here


def queue_total(url: str, queue: str) -> int:
    with replika.Client(url) as client:
        try:
            return int(client.stats(queue)["total"])
        except replika.NotFound:
            return 0


# ----------------------------------------------------------------------------------------------- scenarios
def many_exactly_once(driver: Driver, url: str, tmp: Path, n: int = 500) -> None:
    """``n`` tasks, each run exactly once; the worker then stops cleanly on SIGTERM."""
    rec = tmp / "many.records"
    worker = driver.worker(url, "many", tmp / "many.log", rec)
    try:
        keys = [f"m{i}" for i in range(n)]
        driver.send(url, "many", "run", [(k,) for k in keys])
        wait_until(lambda: len(records.counts(rec, "run")) == n, f"{n} tasks to run", worker)
        wait_until(lambda: queue_total(url, "many") == 0, "every task to be acked", worker)
        runs = records.counts(rec, "run")
        assert set(runs) == set(keys)
        assert [k for k, c in runs.items() if c != 1] == []
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()


def countdown_beyond_lease(driver: Driver, url: str, tmp: Path) -> None:
    """With a 1 s lease: a task delayed 3 s waits in the broker (not in a worker) and runs once after its delay;
    a task that runs 2.5 s is never handed to anyone else meanwhile (its lease is touched)."""
    rec = tmp / "countdown.records"
    worker = driver.worker(url, "countdown", tmp / "countdown.log", rec, lease=1.0)
    try:
        sent = time.time()
        driver.send(url, "countdown", "run", [("c1",)], delay=3.0)
        with replika.Client(url) as client:
            assert client.stats("countdown")["delayed"] == 1  # the broker holds it, not the worker
        driver.send(url, "countdown", "hold", [("h1", str(tmp / "never"), 2.5)])
        wait_until(lambda: records.counts(rec, "run")["c1"] == 1, "the delayed task to run", worker)
        wait_until(lambda: records.counts(rec, "done")["h1"] == 1, "the long task to finish", worker)
        wait_until(lambda: queue_total(url, "countdown") == 0, "both to be acked", worker)
        [run] = [r for r in records.read(rec) if r.event == "run"]
        assert run.at >= sent + 3.0 - 0.05  # never before its delay (the clocks are the same machine's)
        assert records.counts(rec, "run") == {"c1": 1}
        assert records.counts(rec, "start") == {"h1": 1}
    finally:
        worker.stop()


def kill9_redelivered(driver: Driver, url: str, tmp: Path) -> None:
    """A task whose worker is killed with kill -9 in the middle runs again, to the end, on a second worker."""
    rec = tmp / "kill9.records"
    release = tmp / "kill9.release"
    first = driver.worker(url, "kill9", tmp / "kill9-a.log", rec)
    second = None
    try:
        driver.send(url, "kill9", "hold", [("k1", str(release), 60.0)])
        wait_until(lambda: records.counts(rec, "start")["k1"] == 1, "the task to start", first)
        first_pids = first.pids()
        first.kill9()
        release.touch()  # the first worker is gone: only another one can finish the task now
        second = driver.worker(url, "kill9", tmp / "kill9-b.log", rec)
        wait_until(lambda: records.counts(rec, "done")["k1"] == 1, "the task to run again", second)
        [done] = [r for r in records.read(rec) if r.event == "done"]
        assert done.pid not in first_pids
        assert records.counts(rec, "start")["k1"] == 2
    finally:
        first.stop()
        if second is not None:
            second.stop()


def failing_dead_lettered(driver: Driver, url: str, tmp: Path) -> None:
    """A task that keeps failing is retried twice, then lands in the dead-letter queue with its retry history."""
    rec = tmp / "dlq.records"
    worker = driver.worker(url, "dlq", tmp / "dlq.log", rec)
    dlq = driver.dead_letter_queue("dlq")
    try:
        driver.send(url, "dlq", "fail", [("f1",)])
        wait_until(lambda: queue_total(url, dlq) == 1, "the task to be dead-lettered", worker)
        wait_until(lambda: queue_total(url, "dlq") == 0, "the queue to be empty", worker)
        with replika.Client(url) as client:
            [dead] = client.peek(dlq)
        assert records.counts(rec, "fail")["f1"] == 3
        assert dead.headers["replika-dead-letter-queue"] == "dlq"
        assert dead.headers["replika-dead-letter-reason"] == "rejected"
        history = dead.headers[f"{driver.name}-retry-history"].split("\n")
        assert history == ["retry 1: ValueError: boom f1", "retry 2: ValueError: boom f1"]
        assert dead.headers[f"{driver.name}-retries"] == "2"
    finally:
        worker.stop()


def broker_restart_loses_nothing(driver: Driver, tmp: Path, n: int = 300) -> None:
    """The broker is killed with kill -9 and restarted (same port, same store) while tasks are being published
    and run: every task whose publish returned runs; the worker rides through the restart."""
    server = ServerProcess(tmp / "restart-data").start()
    url = server.url
    rec = tmp / "restart.records"
    worker = driver.worker(url, "restart", tmp / "restart.log", rec)
    published: list[str] = []
    errors: list[str] = []

    def publish() -> None:
        try:
            for i in range(n):
                driver.send(url, "restart", "run", [(f"r{i}",)])
                published.append(f"r{i}")
        except BaseException:  # reported by the test below
            errors.append(traceback.format_exc())

    publisher = threading.Thread(target=publish)
    try:
        driver.send(url, "restart", "run", [("warm",)])
        wait_until(lambda: records.counts(rec, "run")["warm"] == 1, "the worker to be up", worker)
        publisher.start()
        wait_until(lambda: len(published) >= n // 3, "a third of the tasks to be published", worker)
        server.kill()
        assert len(published) < n  # the broker died in the middle of the publishing
        server = ServerProcess(tmp / "restart-data", "--port", str(server.port)).start()
        publisher.join(WAIT * 2)
        assert not publisher.is_alive() and not errors, "\n".join(errors)
        wait_until(lambda: set(records.counts(rec, "run")) >= set(published), "every published task to run", worker)
        wait_until(lambda: queue_total(url, "restart") == 0, "the queue to drain", worker)
        assert len(published) == n
        assert worker.alive()
    finally:
        worker.stop()
        server.stop()
