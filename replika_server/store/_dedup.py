"""Deduplication of publishes: per queue, the dedup ids seen within its window, with the id each one stored.

The index is in memory and mirrored in LMDB's ``dedup`` database by the engine, so a repeat is recognised across a
restart. Entries are kept in arrival order, so pruning the ones older than the window is a pop from the front.
"""

from __future__ import annotations

from collections import deque

__all__ = ["DedupIndex"]


class DedupIndex:
    """Dedup ids of one queue: id -> (first seen, unix s; message id stored then)."""

    __slots__ = ("entries", "order")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, int]] = {}
        self.order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, dedup_id: str, now: float, window: float) -> int | None:
        """The message id first stored under ``dedup_id`` if that was less than ``window`` seconds ago."""
        entry = self.entries.get(dedup_id)
        if entry is None or entry[0] + window <= now:
            return None
        return entry[1]

    def add(self, dedup_id: str, at: float, mid: int) -> None:
        self.entries[dedup_id] = (at, mid)
        self.order.append((at, dedup_id))

    def oldest(self) -> float | None:
        """When the oldest entry was seen (unix s), or None when empty."""
        return self.order[0][0] if self.order else None

    def prune(self, now: float, window: float) -> list[str]:
        """Forget the entries seen ``window`` seconds or more before ``now``; the ids forgotten."""
        gone: list[str] = []
        order, entries = self.order, self.entries
        while order and order[0][0] + window <= now:
            at, dedup_id = order.popleft()
            entry = entries.get(dedup_id)
            if entry is not None and entry[0] == at:  # not seen again since (that entry is further back)
                del entries[dedup_id]
                gone.append(dedup_id)
        return gone
