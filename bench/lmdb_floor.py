"""What LMDB itself does on this machine, in one process, with no broker: ``python -m bench.lmdb_floor``.

The floor under W3 (one synced commit per message) and the ceiling over W1 (1,000 puts per synced commit), with
the same environment flags and record sizes as the broker's store, so the broker's figures can be read as a
fraction of them.

It also measures the floor of the one design issue 16 allows for W3: LMDB opened with ``MDB_NOMETASYNC`` (one
fsync per commit, of the data pages; the meta page is flushed by the next commit's) and a small write-ahead
journal written and synced in another thread at the same time, a publish confirmed once both syncs are done.
Its figure is the time until both are done; ``nometasync alone`` is what it would be if the two syncs
overlapped perfectly on this disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import lmdb

KEY = struct.Struct(">IQ")
#: The journal's preallocated size: syncing a write into allocated, already-written blocks is a data-only
#: fdatasync (no size or extent change to flush), the journal's best case.
JOURNAL_BYTES = 64 * 1024**2
JOURNAL_SLOT = 4096


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmdb_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--singles", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three single-commit designs")
    args = parser.parse_args()
    value = os.urandom(args.size + 12)
    with tempfile.TemporaryDirectory(prefix="replika-lmdb-", dir=os.environ.get("REPLIKA_BENCH_DIR")) as tmp:
        env = lmdb.open(tmp, map_size=8 * 1024**3, max_dbs=4, sync=True, metasync=True, readahead=False)
        db = env.open_db(b"msgs")
        mid = 0
        start = time.perf_counter()
        for _ in range(args.batches):
            with env.begin(write=True) as txn:
                txn.cursor(db).putmulti([(KEY.pack(1, mid + i), value) for i in range(1, 1001)])
            mid += 1000
        rate = args.batches * 1000 / (time.perf_counter() - start)
        env.close()
    designs: dict[str, list[float]] = {"synced (the store's)": [], "nometasync + journal": [], "nometasync alone": []}
    for _ in range(args.rounds):  # the designs take turns, so a noisy minute hits all of them
        for name in designs:
            designs[name].append(_singles(name, value, args.singles))
    for name, p50s in designs.items():
        print(
            f"one {name} transaction per {args.size} B message: p50 {statistics.median(p50s) * 1e6:.0f} us "
            f"(rounds: {', '.join(f'{p * 1e6:.0f}' for p in p50s)})"
        )
    print(f"1,000 puts per synced transaction: {rate:,.0f} msg/s")


def _singles(design: str, value: bytes, count: int) -> float:
    """p50 seconds of ``count`` one-message commits in ``design``."""
    with (
        tempfile.TemporaryDirectory(prefix="replika-lmdb-", dir=os.environ.get("REPLIKA_BENCH_DIR")) as tmp,
        ThreadPoolExecutor(1) as journal_thread,
    ):
        env = lmdb.open(
            tmp, map_size=1024**3, max_dbs=4, sync=True, metasync=design.startswith("synced"), readahead=False
        )
        db = env.open_db(b"msgs")
        fd = os.open(os.path.join(tmp, "journal"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, bytes(JOURNAL_BYTES), 0)
            os.fsync(fd)

            def journal(offset: int) -> None:
                os.pwrite(fd, value, offset % JOURNAL_BYTES)
                os.fdatasync(fd)

            use_journal = "journal" in design
            lat = []
            for mid in range(1, count + 1):
                t = time.perf_counter()
                synced = journal_thread.submit(journal, mid * JOURNAL_SLOT) if use_journal else None
                with env.begin(write=True) as txn:
                    txn.put(KEY.pack(1, mid), value, db=db)
                if synced is not None:
                    synced.result()
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
            env.close()
    return statistics.median(lat)


if __name__ == "__main__":
    main()
