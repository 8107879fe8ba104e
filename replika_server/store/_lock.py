"""Exclusive ownership of a data directory: one broker per store, for the life of its process.

LMDB itself lets any number of processes open one environment, but the LMDB engine keeps its indexes (leases,
ready order, id sequences) in the broker's memory, so a second broker on the same files would hand out ids the
first already used and overwrite confirmed messages. The owner therefore holds ``flock(LOCK_EX)`` on
``<data dir>/replika.lock``:

- the kernel drops the lock when the process dies, however it dies (kill -9 included), so a crash never leaves a
  stale lock for an operator to clean up;
- flock locks an open file description, not a process: a second opener in the same process is refused too;
- it is independent of the POSIX record locks LMDB takes on ``lock.mdb``, which the hot backup shares as a reader;
- containers sharing a volume on one host share the kernel's lock table, so they exclude each other as well.
  On network file systems flock is only as good as the server's lock support; run one broker per volume there.

The file holds the owner's pid and host name, so that a refusal can say who holds the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

__all__ = ["LOCK_FILE", "DirectoryLock", "StoreInUse", "secure_directory"]

LOCK_FILE = "replika.lock"
#: Owner-only: every message of the store is in these files.
DIR_MODE = 0o700
FILE_MODE = 0o600


class StoreInUse(Exception):
    """The data directory is owned by another live broker (or restore); nothing in it was touched."""

    def __init__(self, path: Path, holder: str | None) -> None:
        who = f" by {holder}" if holder else ""
        super().__init__(
            f"the data directory {path} is in use{who}: one broker owns a store; stop it first, or give this "
            "broker another --data-dir"
        )
        self.path = path
        self.holder = holder


def secure_directory(path: Path) -> None:
    """Create ``path`` (and its parents) owner-only if missing."""
    # mkdir's mode is filtered by the umask, which never adds bits: 0700 stays 0700 or less.
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)


class DirectoryLock:
    """The exclusive lock on one data directory. :meth:`acquire` takes it or raises :class:`StoreInUse`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        secure_directory(self.path)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreInUse(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # Only the owner writes the file, and only while holding the lock: a refused opener reads a whole record.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the directory up (closing the file drops the lock); idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a later refusal must not name a process that has gone
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str | None:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text or None


def tighten_modes(path: Path) -> list[str]:
    """Make the store's files in ``path`` owner-only if an older version (or a copy) left them readable by
    others; return the names changed. The directory's own mode is the operator's: it may be a mount point."""
    changed = []
    for name in ("data.mdb", "lock.mdb", LOCK_FILE):
        file = path / name
        with contextlib.suppress(OSError):
            if file.stat().st_mode & 0o077:
                file.chmod(FILE_MODE)
                changed.append(name)
    return changed
