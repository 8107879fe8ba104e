"""Benchmark W8: Celery on Replika, on Redis and on RabbitMQ, in the same run.

    python -m bench.w8 [--peers redis,rabbitmq] [--runs 3] [--tasks 5000]

All transports are started first and take turns, one run each per round, so that the machine's other load falls
on each alike. A run: ``--tasks`` no-op tasks are published (8 threads, each with its own connection), then one
worker runs them (``celery worker -c 2 -P prefork``, ``task_acks_late``, prefetch multiplier 4). Throughput
is counted from the tasks' own timestamps, from the 10th percentile task to the last, so that the worker's
start-up is not in it; each transport first gets one unmeasured run of a quarter as many tasks. Then the kill -9
check: a worker is killed with kill -9 in the middle of an acks_late task and a second worker is started; did the
task run again, and how soon?

Replika runs in its default durability (an fsync per group commit, before every confirm); Redis with
``appendonly yes, appendfsync always``; RabbitMQ with a durable queue, persistent messages and publisher confirms
(Celery's defaults there, plus ``confirm_publish``). The peers come from bench/peers (install.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.broker import start_broker

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "w8"
KILL9_QUEUE = "w8k"
PUBLISHERS = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Transport:
    name: str
    url: str
    options: dict[str, Any]
    describe: str
    stop: Callable[[], None]
    pids: list[int] = field(default_factory=list)  # the broker's processes, for its CPU time


@dataclass
class Kill9Outcome:
    redelivered: bool
    after: float | None  # seconds from the kill to the second worker finishing the task
    starts: int  # times the task started (2: once on each worker)
    waited: float

    def summary(self) -> str:
        if self.redelivered:
            return f"ran again on the second worker, done {self.after:.1f} s after the kill"
        return f"not run again within {self.waited:g} s"


@dataclass
class Result:
    transport: str
    describe: str
    rates: list[float] = field(default_factory=list)
    publish_rates: list[float] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)  # CPU microseconds per task: worker, pool, broker
    kill9: Kill9Outcome | None = None


# ----------------------------------------------------------------------------------------------- processes
class Worker:
    """``celery -A bench.w8_app worker`` in its own session, so that kill -9 reaches its pool too."""

    def __init__(self, t: Transport, queue: str, name: str, log: Path, env: dict[str, str]) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "bench.w8_app", "worker", "-Q", queue, "-c", "2"]
        argv += ["-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        argv += ["-n", f"{name}@%h", "--loglevel", "WARNING"]
        full = dict(os.environ, C_FORCE_ROOT="1", W8_BROKER=t.url, W8_TRANSPORT_OPTIONS=json.dumps(t.options), **env)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def group(self) -> set[int]:
        found = {self.proc.pid}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == self.proc.pid:
                    found.add(int(stat.parent.name))
        return found

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench.w8: timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)  # other processes write what we wait for: nothing to await


# ----------------------------------------------------------------------------------------------- transports
def start_transports(workdir: Path, peers: list[str]) -> Iterator[Transport]:
    broker = start_broker(workdir / "replika", admin=False)

    def stop_replika() -> None:
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.wait(60)

    describe = "replika serve, durability sync (fsync per group commit), replika.contrib.kombu"
    yield Transport("replika (sync)", broker.url, {}, describe, stop_replika, [broker.proc.pid])
    from bench.peers import start_peer

    for peer in peers:
        server = start_peer(peer, workdir, fsync=True)
        if peer == "redis":
            url = f"redis://{server.host}:{server.port}/0"
            yield Transport("redis (appendfsync always)", url, {}, server.describe, server.stop, broker_pids(server))
        elif peer == "rabbitmq":
            url = f"amqp://guest:guest@{server.host}:{server.port}//"
            confirms = {"confirm_publish": True}
            rabbit = "rabbitmq (durable, confirms)"
            yield Transport(rabbit, url, confirms, server.describe, server.stop, broker_pids(server))
        else:
            server.stop()
            raise SystemExit(f"bench.w8: no Celery transport for peer {peer!r} (redis, rabbitmq)")


def broker_pids(server: Any) -> list[int]:
    """A peer's server processes (bench/peers starts them), for their CPU time."""
    return [proc.pid for proc in server._procs]


# ----------------------------------------------------------------------------------------------- runs
def publish(t: Transport, task: str, queue: str, n: int, args: tuple[Any, ...] = ()) -> float:
    """Publish ``n`` tasks from PUBLISHERS threads; tasks/s."""
    from kombu import Connection

    from bench.w8_app import app

    errors: list[BaseException] = []

    def one(count: int) -> None:
        try:
            with Connection(t.url, transport_options=t.options) as conn:
                for _ in range(count):
                    app.send_task(f"bench.w8_app.{task}", args=args, queue=queue, connection=conn)
        except BaseException as exc:
            errors.append(exc)

    shares = [n // PUBLISHERS + (1 if i < n % PUBLISHERS else 0) for i in range(PUBLISHERS)]
    threads = [threading.Thread(target=one, args=(c,)) for c in shares if c]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return n / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_sample(worker: Worker, t: Transport) -> dict[str, float]:
    group = worker.group()
    return {
        "worker": cpu_seconds(worker.proc.pid),
        "pool": sum(cpu_seconds(p) for p in group if p != worker.proc.pid),
        "broker": sum(cpu_seconds(p) for p in t.pids),
    }


def throughput(t: Transport, n: int, workdir: Path, run: int) -> tuple[float, float, int, dict[str, float]]:
    """One run: (tasks/s run, tasks/s published, tasks run more than once, CPU microseconds per task of the
    worker's main process, its pool and the broker, between the 10th and the 90th percentile task)."""
    stamps = workdir / f"stamps-{run}"
    published = publish(t, "noop", QUEUE, n)
    worker = Worker(t, QUEUE, f"w8-{run}", workdir / f"worker-{run}.log", {"W8_STAMPS": str(stamps)})
    try:
        size = lambda: stamps.stat().st_size if stamps.exists() else 0  # noqa: E731
        bound = max(120.0, n / 50)
        wait_for(lambda: size() >= 8 * (n // 10), bound, f"{n // 10} tasks to run on {t.name}")
        before, done_before = cpu_sample(worker, t), size() // 8
        wait_for(lambda: size() >= 8 * (n * 9 // 10), bound, f"{n * 9 // 10} tasks to run on {t.name}")
        after, done_after = cpu_sample(worker, t), size() // 8
        wait_for(lambda: size() >= 8 * n, bound, f"{n} tasks to run on {t.name}")
    finally:
        worker.stop()
    data = stamps.read_bytes()
    times = sorted(struct.unpack(f"{len(data) // 8}d", data))
    first = times[n // 10]
    count = max(1, done_after - done_before)
    cpu = {k: (after[k] - before[k]) / count * 1e6 for k in before}
    return (n - 1 - n // 10) / (times[n - 1] - first), published, len(times) - n, cpu


def kill9_check(t: Transport, workdir: Path, wait: float = 30.0) -> Kill9Outcome:
    """A worker is killed with kill -9 while it runs an acks_late task; does a second worker run it again?"""
    events, release = workdir / "kill9.events", workdir / "kill9.release"
    env = {"W8_EVENTS": str(events)}
    read = lambda: events.read_text().split("\n") if events.exists() else []  # noqa: E731
    first = Worker(t, KILL9_QUEUE, "w8-kill9-a", workdir / "kill9-a.log", env)
    second = None
    try:
        publish(t, "hold", KILL9_QUEUE, 1, (str(release), 120.0))
        wait_for(lambda: any(e.startswith("start") for e in read()), 120.0, f"the task to start on {t.name}")
        doomed = first.group()
        first.kill9()
        killed = time.monotonic()
        release.touch()
        second = Worker(t, KILL9_QUEUE, "w8-kill9-b", workdir / "kill9-b.log", env)

        def done() -> bool:
            return any(e.startswith("done") and int(e.split()[1]) not in doomed for e in read())

        with contextlib.suppress(TimeoutError):
            wait_for(done, wait, "the task to run again")
        after = time.monotonic() - killed if done() else None
        starts = sum(1 for e in read() if e.startswith("start"))
        return Kill9Outcome(after is not None, after, starts, wait)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def measure(transports: list[Transport], workdir: Path, runs: int, n: int, kill9: float | None) -> list[Result]:
    """Runs taken in turns (one per transport, then the next round), so that the machine's other load falls on
    every transport alike; then the kill -9 check on each (``kill9``: seconds the second worker gets)."""
    results = [Result(t.name, t.describe) for t in transports]
    dirs = [workdir / f"t{i}" for i in range(len(transports))]
    for t, d in zip(transports, dirs, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        # A first, unmeasured run: a new broker's first thousands of messages also pay for growing its files.
        throughput(t, max(100, n // 4), d, -1)
    for run in range(runs):
        for t, d, result in zip(transports, dirs, results, strict=True):
            rate, pub, dups, cpu = throughput(t, n, d, run)
            result.cpu.append(cpu)
            result.rates.append(rate)
            result.publish_rates.append(pub)
            result.duplicates.append(dups)
            print(f"bench.w8: {t.name} run {run + 1}: {rate:,.0f} tasks/s (published {pub:,.0f}/s)", file=sys.stderr)
    if kill9 is not None:
        for t, d, result in zip(transports, dirs, results, strict=True):
            result.kill9 = kill9_check(t, d, kill9)
            print(f"bench.w8: {t.name} kill -9: {result.kill9.summary()}", file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    base = statistics.median(results[0].rates)
    lines = [
        "| transport | tasks/s (median) | min-max | runs | Replika advantage | published tasks/s (8 threads) "
        "| CPU µs per task: worker / pool / broker | kill -9 mid-task (acks_late) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        med = statistics.median(r.rates)
        adv = "" if r is results[0] else f"{base / med:.2f}x"
        kill = r.kill9.summary() if r.kill9 else "not run"
        cpu = " / ".join(f"{statistics.median(c[k] for c in r.cpu):.0f}" for k in ("worker", "pool", "broker"))
        lines.append(
            f"| {r.transport} | {med:,.0f} | {min(r.rates):,.0f}-{max(r.rates):,.0f} | {len(r.rates)} | {adv} "
            f"| {statistics.median(r.publish_rates):,.0f} | {cpu} | {kill} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.w8", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="redis,rabbitmq", help="comma-separated: redis, rabbitmq ('' for none)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tasks", type=int, default=5000, help="tasks per run")
    p.add_argument("--kill9-wait", type=float, default=30.0, help="seconds the second worker is given")
    p.add_argument("--no-kill9", dest="kill9", action="store_false")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--smoke", action="store_true", help="Replika only, 200 tasks, one run: checks the harness")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = [] if args.smoke else [p.strip() for p in args.peers.split(",") if p.strip()]
    runs, n = (1, 200) if args.smoke else (args.runs, args.tasks)
    with tempfile.TemporaryDirectory(prefix="replika-w8-") as tmp:
        workdir = Path(tmp)
        transports: list[Transport] = []
        try:
            transports.extend(start_transports(workdir, peers))
            kill9 = args.kill9_wait if args.kill9 and not args.smoke else None
            results = measure(transports, workdir, runs, n, kill9)
        finally:
            for t in transports:
                t.stop()
    print(table(results))
    for r in results:
        print(f"- {r.transport}: {r.describe}; tasks run twice: {sum(r.duplicates)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"w8-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"tasks": n, "runs": runs, "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
