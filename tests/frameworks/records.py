"""What the framework tests' tasks leave behind: one line per event, appended by any process to one file.

A line is ``<event> <key> <pid> <unix time>``; appends of one short line with O_APPEND are atomic on Linux, so
workers and their children may write at once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Record", "read", "write"]

ENV = "REPLIKA_TEST_RECORDS"


@dataclass(frozen=True)
class Record:
    event: str
    key: str
    pid: int
    at: float


def write(event: str, key: object, path: str | None = None) -> None:
    """Append one record to the file named by ``$REPLIKA_TEST_RECORDS`` (or ``path``)."""
    line = f"{event} {key} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path or os.environ[ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: Path) -> list[Record]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, key, pid, at = line.split(" ")
        out.append(Record(event, key, int(pid), float(at)))
    return out


def counts(path: Path, event: str) -> Counter[str]:
    return Counter(r.key for r in read(path) if r.event == event)
