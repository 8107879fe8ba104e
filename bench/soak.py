"""A long mixed load against one broker, watching it for leaks: ``python -m bench.soak --minutes N``.

Starts ``replika serve`` (with its admin sidecar) and runs, all at a fixed rate so that the broker reaches a
steady state instead of a growing backlog: publishers on three connections (single publishes, batches, topic
publishes fanned out to two bound queues, some delayed), consumers on three more that ack most messages, nack
some (half of them with a delay) and so see them again, a task that opens a fresh connection for each of a few
requests a second (connection churn), and an admin poller (``/api/queues``, ``/api/info``, ``/metrics``).

Every ``--interval`` seconds (10) it samples the broker process: RSS, open file descriptors, the queues' depths
(ready, in flight, delayed) and the p50/p99 of the publish confirms of that interval. At the end it writes the
samples (JSON) and a plot (PNG, with matplotlib) to ``--out``, and flags growth after the warm-up (the first
``--warmup`` fraction of the run): RSS above ``--max-rss-growth`` (5%), open fds above the warm-up's most plus
``FD_SLACK`` (connections come and go, a leak only grows), a p99 more than ``LATENCY_FLAG`` times the early one.
Exit code 1 if anything is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import replika
from bench.broker import BrokerProcess, start_broker

__all__ = ["FD_SLACK", "LATENCY_FLAG", "Sample", "SoakReport", "analyse", "main", "soak"]

#: Open fds the broker may show above its warm-up maximum: the churn and poller connections open at that instant.
FD_SLACK = 8
#: A late p99 this many times the early one is flagged (a noisy, shared machine: only a trend this big counts).
LATENCY_FLAG = 3.0
WORK, RETRY = "soak.work", "soak.retry"
TOPIC_QUEUES = ("soak.events.a", "soak.events.b")


@dataclass
class Sample:
    """One look at the broker: seconds since start, RSS (KiB), open fds, depths by queue, confirm latency (ms)."""

    t: float
    rss_kib: int
    fds: int
    depths: dict[str, dict[str, int]]
    p50_ms: float | None
    p99_ms: float | None
    published: int
    consumed: int
    churned: int
    polls: int


@dataclass
class SoakReport:
    """The samples and what the analysis flagged (empty: steady)."""

    samples: list[Sample]
    warmup_samples: int
    rss_growth: float  # after the warm-up: (final - baseline) / baseline
    fd_growth: int  # the last sample's fds minus the warm-up's maximum
    p99_ratio: float | None  # late p99 / early p99
    flags: list[str] = field(default_factory=list)


@dataclass
class _Counts:
    published: int = 0
    consumed: int = 0
    churned: int = 0
    polls: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, since the last sample


# ----------------------------------------------------------------------------------------------- the load
async def _publisher(url: str, n: int, rate: float, counts: _Counts, stop: asyncio.Event) -> None:
    rng = random.Random(n)
    async with replika.AsyncClient(url) as client:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            kind = rng.random()
            payload = f"{n}:{i}".encode().ljust(rng.choice((64, 256, 2048)), b".")
            if kind < 0.5:
                await client.publish(WORK, payload)
                sent = 1
            elif kind < 0.7:
                sent = len(await client.publish_many(WORK, [payload] * 10))
            elif kind < 0.85:
                await client.publish_topic("soak.events.tick", payload)
                sent = 2
            else:
                await client.publish(WORK, payload, delay=rng.choice((0.2, 1.0)))
                sent = 1
            counts.latencies.append(time.perf_counter() - started)
            counts.published += sent
            i += 1
            with contextlib.suppress(TimeoutError):  # the pace of the load, not a wait for a condition
                await asyncio.wait_for(stop.wait(), sent / rate)


async def _consumer(url: str, queue: str, seed: int, counts: _Counts, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    async with replika.AsyncClient(url) as client:
        while not stop.is_set():
            msgs = await client.fetch(queue, max=50, wait=0.5, lease=10.0)
            if not msgs:
                continue
            nack = [m for m in msgs if m.attempts == 1 and rng.random() < 0.1]
            nacked = {m.id for m in nack}
            keep = [m for m in msgs if m.id not in nacked]
            if nack:
                await client.nack(nack, delay=rng.choice((None, 0.5)))
            if keep:
                await client.ack(keep)
            counts.consumed += len(keep)


async def _churn(url: str, counts: _Counts, stop: asyncio.Event, per_second: float = 5.0) -> None:
    while not stop.is_set():
        async with replika.AsyncClient(url) as client:
            await client.publish(RETRY, b"churn")
            await client.ack(await client.fetch(RETRY, max=10))
            await client.stats(RETRY)
        counts.churned += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1 / per_second)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return bytes(reply.read())


async def _poller(admin_port: int, counts: _Counts, stop: asyncio.Event) -> None:
    base = f"http://127.0.0.1:{admin_port}"
    while not stop.is_set():
        for path in ("/api/queues", "/api/info", "/metrics"):
            await asyncio.to_thread(_get, base + path)
        counts.polls += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# ----------------------------------------------------------------------------------------------- sampling
def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


async def _sample(broker: BrokerProcess, client: replika.AsyncClient, t0: float, counts: _Counts) -> Sample:
    pid = broker.proc.pid
    depths = {
        q["queue"]: {k: q[k] for k in ("ready", "in_flight", "delayed")}
        for q in await client.queues()
        if q["queue"].startswith("soak.")
    }
    latencies, counts.latencies = counts.latencies, []
    return Sample(
        t=round(time.monotonic() - t0, 1),
        rss_kib=_status(pid, "VmRSS"),
        fds=_fds(pid),
        depths=depths,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        published=counts.published,
        consumed=counts.consumed,
        churned=counts.churned,
        polls=counts.polls,
    )


def analyse(
    samples: list[Sample], warmup: float = 0.2, max_rss_growth: float = 0.05, fd_slack: int = FD_SLACK
) -> SoakReport:
    """Flag growth after the first ``warmup`` fraction of ``samples``: RSS (final = median of the last three
    samples, against the first sample after the warm-up), open fds, and the p99 of the last third against the
    first third after the warm-up."""
    n = max(1, min(len(samples) - 2, round(len(samples) * warmup)))
    early, settled = samples[:n], samples[n:]
    baseline = settled[0].rss_kib
    final = statistics.median(s.rss_kib for s in settled[-3:])
    rss_growth = (final - baseline) / baseline
    fd_growth = settled[-1].fds - max(s.fds for s in early)
    third = max(1, len(settled) // 3)
    first = [s.p99_ms for s in settled[:third] if s.p99_ms is not None]
    last = [s.p99_ms for s in settled[-third:] if s.p99_ms is not None]
    ratio = statistics.median(last) / statistics.median(first) if first and last else None
    report = SoakReport(samples, n, round(rss_growth, 4), fd_growth, round(ratio, 2) if ratio else None)
    if rss_growth > max_rss_growth:
        report.flags.append(f"RSS grew {rss_growth:.1%} after the warm-up ({baseline} -> {final} KiB)")
    if fd_growth > fd_slack:
        report.flags.append(f"open fds grew by {fd_growth} after the warm-up")
    if ratio is not None and ratio > LATENCY_FLAG:
        report.flags.append(f"p99 latency rose {ratio:.1f}x after the warm-up")
    return report


# ----------------------------------------------------------------------------------------------- the run
async def soak(
    seconds: float, *, interval: float = 10.0, rate: float = 400.0, workdir: Path | None = None, **analysis: Any
) -> SoakReport:
    """Run the load for ``seconds`` at ``rate`` published messages per second, sampling every ``interval``
    seconds, against a broker started in ``workdir`` (a temporary directory if None); return the analysis."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="replika-soak-")))
        broker = start_broker(workdir, admin=True)
        stack.callback(_stop, broker)
        broker.wait_for_sidecar()
        assert broker.admin_port is not None
        samples = await _run(broker, seconds, interval, rate)
    return analyse(samples, **analysis)


async def _run(broker: BrokerProcess, seconds: float, interval: float, rate: float) -> list[Sample]:
    counts, stop = _Counts(), asyncio.Event()
    async with replika.AsyncClient(broker.url) as admin:
        await admin.declare(WORK, max_attempts=5)
        for queue in TOPIC_QUEUES:
            await admin.bind(queue, "soak.events.*")
        assert broker.admin_port is not None
        tasks = [asyncio.ensure_future(_publisher(broker.url, n, rate / 3, counts, stop)) for n in range(3)]
        tasks += [
            asyncio.ensure_future(_consumer(broker.url, queue, n, counts, stop))
            for n, queue in enumerate((WORK, *TOPIC_QUEUES))
        ]
        tasks += [asyncio.ensure_future(_churn(broker.url, counts, stop))]
        tasks += [asyncio.ensure_future(_poller(broker.admin_port, counts, stop))]
        t0 = time.monotonic()
        samples: list[Sample] = []
        try:
            while time.monotonic() - t0 < seconds:
                done, _ = await asyncio.wait(tasks, timeout=min(interval, seconds - (time.monotonic() - t0)))
                for task in done:
                    task.result()  # a load task that stopped raises its error here
                samples.append(await _sample(broker, admin, t0, counts))
                print(_line(samples[-1]), flush=True)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    return samples


def _stop(broker: BrokerProcess) -> None:
    broker.proc.terminate()
    try:
        broker.proc.wait(30)
    except Exception:
        broker.proc.kill()
        broker.proc.wait()


def _line(s: Sample) -> str:
    depth = sum(d["ready"] + d["in_flight"] + d["delayed"] for d in s.depths.values())
    return (
        f"t={s.t:7.1f}s rss={s.rss_kib / 1024:7.1f} MiB fds={s.fds:4d} depth={depth:6d} "
        f"p50={s.p50_ms} ms p99={s.p99_ms} ms published={s.published} consumed={s.consumed} churn={s.churned}"
    )


def plot(report: SoakReport, path: Path) -> None:
    """RSS, open fds, queue depths and publish latency against time, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in report.samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, [s.rss_kib / 1024 for s in report.samples])
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].plot(t, [s.fds for s in report.samples])
    axes[1].set_ylabel("open fds")
    for queue in sorted({q for s in report.samples for q in s.depths}):
        depth = [sum(s.depths.get(queue, {}).values()) for s in report.samples]
        axes[2].plot(t, depth, label=queue)
    axes[2].set_ylabel("queue depth (msgs)")
    axes[2].legend(fontsize="small")
    axes[3].plot(t, [s.p50_ms for s in report.samples], label="p50")
    axes[3].plot(t, [s.p99_ms for s in report.samples], label="p99")
    axes[3].set_ylabel("publish confirm (ms)")
    axes[3].set_xlabel("minutes")
    axes[3].legend(fontsize="small")
    warm = report.samples[report.warmup_samples].t / 60
    for ax in axes:
        ax.axvline(warm, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(f"replika soak: RSS growth {report.rss_growth:.1%}, fd growth {report.fd_growth}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="length of the run (default 15)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--rate", type=float, default=400.0, help="messages published per second (default 400)")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run not judged (default 0.2)")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="RSS growth flagged (default 0.05)")
    parser.add_argument("--out", type=Path, default=Path("bench/soak-results"), help="where to write JSON and PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    report = asyncio.run(
        soak(
            args.minutes * 60,
            interval=args.interval,
            rate=args.rate,
            warmup=args.warmup,
            max_rss_growth=args.max_rss_growth,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(asdict(report), indent=1))
    if not args.no_plot:
        plot(report, args.out / "soak.png")
    print(
        f"soak: {len(report.samples)} samples, RSS growth {report.rss_growth:.2%} after warm-up, "
        f"fd growth {report.fd_growth}, p99 ratio {report.p99_ratio}; flags: {report.flags or 'none'}"
    )
    return 1 if report.flags else 0


if __name__ == "__main__":
    sys.exit(main())
