"""A clock for stores under test that moves only when the test says so (``StoreOptions.clock``)."""

from __future__ import annotations

__all__ = ["START_MONOTONIC", "START_WALL", "ManualClock"]

#: Where a manual clock starts, in unix seconds (2027) and in monotonic seconds. The two scales start far apart, as
#: the real ones do, so that a store which mixes them up (a deadline on one scale read against the other) fails.
START_WALL = 1_800_000_000.0
START_MONOTONIC = 10_000.0


class ManualClock:
    """Wall-clock and monotonic time that stand still until :meth:`advance` moves both by the same amount.

    Satisfies :class:`replika_server.store.Clock`. Timer tests advance it instead of sleeping: a lease, a delay or a
    TTL ends exactly when the test moves the clock past it, however loaded the machine is.
    """

    __slots__ = ("_monotonic", "_wall")

    def __init__(self, wall: float = START_WALL, monotonic: float = START_MONOTONIC) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def time(self) -> float:
        """Wall-clock time, unix seconds."""
        return self._wall

    def monotonic(self) -> float:
        """Monotonic time, seconds."""
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds`` (never back: neither real clock a store reads does)."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, not by {seconds} s")
        self._wall += seconds
        self._monotonic += seconds
