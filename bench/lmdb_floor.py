"""What LMDB itself does on this machine, in one process, with no broker: ``python -m bench.lmdb_floor``.

The floor under W3 (one synced commit per message) and the ceiling over W1 (1,000 puts per synced commit), with
the same environment flags and record sizes as the broker's store, so the broker's figures can be read as a
fraction of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time

import lmdb

KEY = struct.Struct(">IQ")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmdb_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--singles", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    value = os.urandom(args.size + 12)
    with tempfile.TemporaryDirectory(prefix="replika-lmdb-") as tmp:
        env = lmdb.open(tmp, map_size=8 * 1024**3, max_dbs=4, sync=True, metasync=True, readahead=False)
        db = env.open_db(b"msgs")
        mid = 0
        lat = []
        for _ in range(args.singles):
            mid += 1
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(KEY.pack(1, mid), value, db=db)
            lat.append(time.perf_counter() - t)
        lat.sort()
        start = time.perf_counter()
        for _ in range(args.batches):
            with env.begin(write=True) as txn:
                txn.cursor(db).putmulti([(KEY.pack(1, mid + i), value) for i in range(1, 1001)])
            mid += 1000
        rate = args.batches * 1000 / (time.perf_counter() - start)
        env.close()
    print(
        f"one synced transaction per {args.size} B message: p50 {statistics.median(lat) * 1e6:.0f} us, "
        f"p99 {lat[int(len(lat) * 0.99)] * 1e6:.0f} us ({1 / statistics.median(lat):,.0f} commits/s)"
    )
    print(f"1,000 puts per synced transaction: {rate:,.0f} msg/s")


if __name__ == "__main__":
    main()
