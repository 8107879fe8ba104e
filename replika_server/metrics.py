"""Histograms the broker and server keep for the Prometheus endpoint: fixed buckets, a counter bump per event.

Deliberately tiny (no client library on the hot path): ``observe`` is one bisect and three additions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["BATCH_OPS_BUCKETS", "LATENCY_BUCKETS", "Histogram"]

#: Seconds: from a fast group commit (well under a millisecond) to a stalled disk.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Requests per group commit.
BATCH_OPS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Counts of observations per bucket (``le`` upper bounds, the last bucket +Inf), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ending with (inf, count)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
