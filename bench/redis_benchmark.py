"""Replika's W1 against Redis's own C benchmark on the same machine: ``python -m bench.redis_benchmark``.

Issue 3's second W1 target: Replika publishing (256 B, batches of 1,000, confirmed) at least twice what
``redis-benchmark -P 16 -c 50`` gets running XADD against a Redis with ``appendfsync always``. The C client takes
redis-py's cost out of Redis's figure, so this compares the servers. Replika runs W1 with ``--connections``
(default 8) so that group commit spans connections, as Redis's 50 clients do.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.peers._proc import require_binary
from bench.peers.redis_peer import start


def redis_benchmark(runs: int, requests: int, size: int) -> list[float]:
    binary = require_binary("redis", "redis-benchmark")
    rates = []
    with tempfile.TemporaryDirectory(prefix="replika-redis-benchmark-") as tmp, start(Path(tmp), fsync=True) as peer:
        for run in range(runs):
            argv = [str(binary), "-h", peer.host, "-p", str(peer.port), "-P", "16", "-c", "50", "-n", str(requests)]
            argv += ["-q", "XADD", f"bench{run}", "*", "f", "x" * size]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
            found = re.findall(r"([\d.]+) requests per second", out)
            if not found:
                raise SystemExit(f"redis-benchmark printed no rate:\n{out}")
            rates.append(float(found[-1]))
    return rates


def replika_w1(runs: int, count: int, size: int, connections: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="replika-w1-") as out:
        argv = [sys.executable, "-m", "bench", "--workloads", "W1", "--runs", str(runs), "--count", str(count)]
        argv += ["--size", str(size), "--connections", str(connections), "--quiet", "--out", out]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        [result] = Path(out).glob("results-*.json")
        [row] = json.loads(result.read_text())["rows"]
    return row["median"], row["low"], row["high"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300_000, help="XADDs per redis-benchmark run")
    parser.add_argument("--count", type=int, default=200_000, help="messages per Replika W1 run")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    rates = redis_benchmark(args.runs, args.requests, args.size)
    median, low, high = replika_w1(args.runs, args.count, args.size, args.connections)
    theirs = statistics.median(rates)
    print(
        f"redis-benchmark -P 16 -c 50 XADD ({args.size} B field, appendfsync always): median {theirs:,.0f} req/s "
        f"[{min(rates):,.0f}-{max(rates):,.0f}]"
    )
    print(
        f"replika W1, {args.connections} connections, batches of 1,000: median {median:,.0f} msg/s "
        f"[{low:,.0f}-{high:,.0f}]"
    )
    print(f"ratio: {median / theirs:.2f}x")


if __name__ == "__main__":
    main()
