"""Replika's benchmark harness: ``python -m bench`` (also ``./dev bench`` and ``replika bench``).

Starts a broker on a temporary store and, with ``--peers``, the named peers on their own temporary data dirs
(installing them through ``bench/peers/install.sh`` when ``--install-peers`` is given), runs the workloads
W1-W7 ``--runs`` times against each, and prints a table of medians with min-max spread and Replika's
advantage per peer, writes it as JSON, and draws a PNG chart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import itertools
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.broker import start_broker
from bench.drivers.base import PeerUnavailable, System
from bench.drivers.replika_driver import ReplikaDriver
from bench.harness import Progress, run_all, table, write_chart, write_json
from bench.workloads import WORKLOADS, Params

HERE = Path(__file__).resolve().parent
PEERS = ("redis", "nats", "rabbitmq", "beanstalkd")
#: The young generation's threshold with --client-gc tuned (the broker's own, replika_server.node).
CLIENT_GC_YOUNG = 10_000
_DRIVERS = {
    "redis": ("bench.drivers.redis_driver", "RedisStreamsDriver"),
    "nats": ("bench.drivers.nats_driver", "JetStreamDriver"),
    "rabbitmq": ("bench.drivers.rabbitmq_driver", "RabbitDriver"),
    "beanstalkd": ("bench.drivers.beanstalkd_driver", "BeanstalkDriver"),
}


def start_replika(
    workdir: Path,
    durability: str,
    quiet: bool = False,
    history: str = "off",
    store: str | None = None,
    nodes: int = 1,
) -> list[System]:
    """Replika: one broker on a temporary LMDB store, or ``nodes`` brokers on the PostgreSQL ``store`` (whose
    drivers, one per connection, go to the nodes in turn), as one system per ``history`` setting (off, on or
    both): with both, the two share the brokers and differ only in how each workload's queue is declared, so
    that the runs compare history's cost alone."""
    flags = ["--durability", durability] + (["--store", store] if store else [])
    brokers = [start_broker(workdir / f"replika-{nodes}-{i}", *flags) for i in range(nodes)]
    for broker in brokers:
        broker.wait_for_sidecar()  # measuring starts once it has loaded
    if not quiet:
        # The admin sidecar on a free port: its dashboard shows the runs live.
        print(f"bench: the broker's live dashboard: http://127.0.0.1:{brokers[0].admin_port}/", file=sys.stderr)
    urls = itertools.cycle([b.url for b in brokers])

    async def stop() -> None:
        for broker in brokers:
            broker.proc.send_signal(signal.SIGTERM)
        for broker in brokers:
            await asyncio.to_thread(broker.proc.wait, 60)

    if store is None:
        name, note = f"replika ({durability}", f"durability={durability}"
    else:
        name, note = (
            f"replika on postgresql ({nodes} node{'s' if nodes > 1 else ''}",
            f"{nodes} brokers on one database",
        )
    settings = {"off": [False], "on": [True], "both": [False, True]}[history]
    systems = [
        System(
            f"{name}{', history' if on else ''})",
            lambda on=on: ReplikaDriver(next(urls), history=on),
            None,
            [note, f"history={'on (declare history=True)' if on else 'off'}"],
        )
        for on in settings
    ]
    systems[-1].stop = stop  # the brokers stop once, after all their systems
    return systems


def start_pgmq_baseline(store: str) -> System:
    """The pgmq-style baseline on the same database (see bench/drivers/pgmq_driver.py)."""
    from bench.drivers.pgmq_driver import PgmqDriver

    note = "psycopg 3, INSERT ... unnest, FOR UPDATE SKIP LOCKED claim, DELETE at ack, synchronous_commit on"
    return System("pgmq-style (postgresql)", lambda: PgmqDriver(store), None, [note])


def start_peer_system(peer: str, workdir: Path, fsync: bool) -> System:
    try:
        from bench.peers import start_peer

        module, cls = _DRIVERS[peer]
        driver_cls = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise PeerUnavailable(
            f"{peer}: its Python client is missing ({exc}): pip install -r bench/requirements.txt"
        ) from None
    server = start_peer(peer, workdir / f"{peer}-{'fsync' if fsync else 'default'}", fsync)
    label = f"{peer} ({'fsync always' if fsync else 'default'})"

    async def stop() -> None:
        await asyncio.to_thread(server.stop)

    return System(label, lambda: driver_cls(server.host, server.port), stop, [server.describe])


def install_peers(peers: list[str]) -> None:
    """Install what the named peers need: their servers (Debian packages, as root) and Python clients (pip).
    Both steps are idempotent and quick when everything is there; a failure leaves the peer to be skipped."""
    subprocess.run(["bash", str(HERE / "peers" / "install.sh"), *peers], check=False)
    missing = []
    for peer in peers:
        try:
            importlib.import_module(_DRIVERS[peer][0])
        except ImportError:
            missing.append(peer)
    if missing:
        print(f"bench: installing the Python clients of {', '.join(missing)}", file=sys.stderr)
        req = HERE / "requirements.txt"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(req)], check=False)
        importlib.invalidate_caches()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="replika bench", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="", help=f"comma-separated peers to compare with: {','.join(PEERS)}")
    p.add_argument("--peer-settings", choices=("fsync", "default", "both"), default="fsync")
    p.add_argument(
        "--no-install-peers",
        dest="install_peers",
        action="store_false",
        help="do not install missing peers (by default their Debian packages and Python clients are installed)",
    )
    p.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6,W7", help="comma-separated subset of W1..W7")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=Params.count, help="messages per run")
    p.add_argument("--size", type=int, default=Params.size, help="payload bytes")
    p.add_argument("--batch", type=int, default=Params.batch, help="messages per request")
    p.add_argument("--connections", type=int, default=Params.connections, help="connections in W1 and W2")
    p.add_argument("--singles", type=int, default=Params.singles, help="round trips in W3")
    p.add_argument("--w4-rate", type=int, default=Params.w4_rate, help="msg/s of W4's latency run")
    p.add_argument("--w5-connections", default="1,16,64,256")
    p.add_argument("--w6-sizes", default="16,256,4096,65536,1048576")
    p.add_argument("--w6-bytes", type=int, default=Params.w6_bytes)
    p.add_argument("--w7-count", type=int, default=Params.w7_count, help="messages per W7 run, at most")
    p.add_argument("--w7-seconds", type=float, default=Params.w7_seconds, help="seconds per W7 run, at most")
    p.add_argument(
        "--redis-no-xdel", action="store_true", help="Redis driver: XACK without XDEL in W2's batched consume"
    )
    p.add_argument(
        "--client-gc",
        choices=("tuned", "default"),
        default="tuned",
        help="this process's garbage collector, where every system's client runs: tuned as README advises a busy "
        "consumer (gc.freeze, young threshold 10,000), or Python's default",
    )
    p.add_argument("--durability", choices=("sync", "relaxed"), default="sync", help="Replika's mode")
    p.add_argument(
        "--history",
        choices=("off", "on", "both"),
        default="off",
        help="declare Replika's queues with message history on; both: one system each, runs alternating",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        help="run Replika on this PostgreSQL database (postgresql://...) instead of a temporary LMDB store, beside "
        "a pgmq-style baseline on the same database",
    )
    p.add_argument("--nodes", default="1", help="with --store: comma-separated broker counts to run, e.g. 1,2,3")
    p.add_argument("--timeout", type=float, default=Params.timeout, help="seconds allowed per workload run")
    p.add_argument("--out", type=Path, default=HERE / "out", help="directory for the JSON and PNG")
    p.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, measures nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    if args.smoke:
        return Params(
            count=200,
            batch=50,
            singles=20,
            w4_rate=500,
            w5_connections=(1, 4),
            w6_sizes=(16, 4096),
            w6_bytes=65536,
            w7_count=200,
        )
    return Params(
        count=args.count,
        size=args.size,
        batch=args.batch,
        connections=args.connections,
        singles=args.singles,
        w4_rate=args.w4_rate,
        w5_connections=tuple(int(x) for x in args.w5_connections.split(",")),
        w6_sizes=tuple(int(x) for x in args.w6_sizes.split(",")),
        w6_bytes=args.w6_bytes,
        w7_count=args.w7_count,
        w7_seconds=args.w7_seconds,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = params_from(args)
    if args.redis_no_xdel:
        from bench.drivers.redis_driver import RedisStreamsDriver

        RedisStreamsDriver.xdel = False
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad_peers = [p for p in peers if p not in PEERS]
    if unknown or bad_peers:
        print(f"bench: unknown workloads {unknown} or peers {bad_peers}", file=sys.stderr)
        return 2
    if args.install_peers and peers:
        install_peers(peers)
    settings = {"fsync": [True], "default": [False], "both": [True, False]}[args.peer_settings]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="replika-bench-") as tmp:
        workdir = Path(tmp)
        if args.store:
            systems = []
            for n in (int(x) for x in args.nodes.split(",")):
                systems += start_replika(workdir, args.durability, args.quiet, args.history, args.store, n)
            systems.append(start_pgmq_baseline(args.store))
        else:
            systems = start_replika(workdir, args.durability, args.quiet, args.history)
        for peer in peers:
            for fsync in settings:
                try:
                    systems.append(start_peer_system(peer, workdir, fsync))
                except PeerUnavailable as exc:
                    print(f"bench: skipping {peer}: {exc}", file=sys.stderr)
        if args.client_gc == "tuned":
            # Every system's client runs in this process: at these rates Python's default collector walks the
            # objects a client holds (its deliveries, its drivers) hundreds of times a second, a cost of the
            # harness's process, not of the system measured. README tells a consumer to do the same.
            gc.freeze()
            gc.set_threshold(CLIENT_GC_YOUNG, *gc.get_threshold()[1:])
        progress = Progress(len(systems) * args.runs * len(workloads), enabled=not args.quiet)
        try:
            rows, failures = asyncio.run(run_all(systems, workloads, params, args.runs, progress))
        finally:
            for system in systems:
                if system.stop is not None:
                    asyncio.run(system.stop())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"results-{stamp}.json"
    png_path = args.out / f"results-{stamp}.png"
    write_json(json_path, rows, params, systems, failures)
    charted = write_chart(png_path, rows)
    print(table(rows, systems[0].name))
    for system in systems:
        print(f"- {system.name}: {'; '.join(system.notes)}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"\nJSON: {json_path}")
    print(f"chart: {png_path}" if charted else "chart: skipped (pip install -r bench/requirements.txt)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
