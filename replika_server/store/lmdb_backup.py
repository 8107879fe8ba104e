"""The LMDB engine's backup and restore: a consistent copy of a store, taken beside a broker that keeps serving.

The copy runs in its own process on the store's directory, not through the broker: LMDB lets another process
read a snapshot while the broker writes (readers never block the writer), so a backup costs the broker no event
loop time, no protocol op and no permission model of its own, and it streams no payload through a socket. The
price: it must run on the broker's host, as a user who may open the store's lock file (``docker exec``,
``kubectl exec``, ``sudo -u replika``).

The copy is one read transaction, so it holds exactly the messages of one commit: every publish confirmed before
the backup began, and nothing half-written. While it runs, the broker cannot reuse the pages that snapshot still
sees, so the store file may grow by what is written meanwhile. The copy is compacted (free pages left out) and
appears under its final name only once complete and synced; ``replika serve --data-dir DIR`` serves it as is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import lmdb

from replika_server.store._lock import FILE_MODE, DirectoryLock
from replika_server.store.base import BackupError, BackupResult, StoreExists

__all__ = ["hot_copy", "restore"]

#: How often to start over when the broker grows its map between our opening the store and the copy's read
#: transaction starting (LMDB then refuses the transaction until we adopt the new size).
_RESIZE_RETRIES = 5


def hot_copy(data_dir: Path, dest: Path) -> BackupResult:
    """Copy the store in ``data_dir`` (served or not) to the new directory ``dest`` (absent or empty)."""
    if not (data_dir / "data.mdb").is_file():
        raise BackupError(f"no store in {data_dir} (it has no data.mdb)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists and is not an empty directory")
    started = time.monotonic()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Mode 0700, beside the destination so that the final rename stays on one file system.
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        raise BackupError(f"cannot create {dest}: {exc}") from None
    try:
        _copy(data_dir, work)
        copied = work / "data.mdb"
        copied.chmod(0o600)  # every message is in it
        _fsync(copied)
        _check(work)
        os.rename(work, dest)  # replaces an empty directory; the backup appears whole or not at all
        _fsync(dest.parent)
        size = (dest / "data.mdb").stat().st_size
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise BackupError(f"cannot write the backup: {exc}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BackupResult(dest, size, time.monotonic() - started)


def restore(backup: Path, data_dir: Path, *, force: bool = False) -> BackupResult:
    """Make the backup in ``backup`` the store of ``data_dir``. Holds ``data_dir``'s broker lock throughout, so a
    live broker's store is never overwritten (:class:`~replika_server.store.StoreInUse`), and refuses to replace
    an existing store unless ``force``. The new ``data.mdb`` appears whole (written aside, synced, renamed)."""
    if not (backup / "data.mdb").is_file():
        raise BackupError(f"no backup in {backup} (it has no data.mdb)")
    _check(backup)
    started = time.monotonic()
    lock = DirectoryLock(data_dir).acquire()  # raises StoreInUse while a broker serves data_dir
    try:
        target = data_dir / "data.mdb"
        if target.exists() and not force:
            raise StoreExists(f"{data_dir} already holds a store; --force replaces it (its messages are lost)")
        partial = data_dir / ".data.mdb.restoring"
        try:
            with open(backup / "data.mdb", "rb") as src, open(partial, "wb", opener=_private) as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.rename(partial, target)
            # The reader table of whatever store was here; LMDB makes a new one for the new file.
            (data_dir / "lock.mdb").unlink(missing_ok=True)
            _fsync(data_dir)
            size = target.stat().st_size
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BackupError(f"cannot restore into {data_dir}: {exc}") from None
    finally:
        lock.release()
    return BackupResult(target, size, time.monotonic() - started)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


def _copy(data_dir: Path, work: Path) -> None:
    data_file = data_dir / "data.mdb"
    try:
        # lock=True is what makes this safe while the broker writes: our read transaction takes a slot in the
        # shared reader table, which stops the broker from reusing the pages our snapshot reads. The map is
        # only address space; room for growth spares most retries.
        env = lmdb.open(
            str(data_dir), readonly=True, lock=True, max_dbs=0, map_size=2 * data_file.stat().st_size + 2**28
        )
    except (lmdb.Error, OSError) as exc:
        raise BackupError(f"cannot open the store in {data_dir}: {exc}") from None
    try:
        # Free the reader slots of processes that died holding one (a killed earlier backup, say), which would
        # otherwise keep the broker from reusing pages for as long as the broker runs.
        env.reader_check()
        for attempt in range(_RESIZE_RETRIES):
            try:
                env.copy(str(work), compact=True)
                return
            except lmdb.MapResizedError:
                (work / "data.mdb").unlink(missing_ok=True)
                if attempt == _RESIZE_RETRIES - 1:
                    raise BackupError("the store kept growing faster than the backup could start") from None
                env.set_mapsize(0)  # adopt the size the broker set
    except lmdb.Error as exc:
        raise BackupError(f"copying the store failed: {exc}") from None
    finally:
        env.close()


def _check(work: Path) -> None:
    """Open the copy as the broker will, and read its catalogue: a copy LMDB cannot open is no backup."""
    try:
        env = lmdb.open(str(work), readonly=True, lock=False, max_dbs=0)
        try:
            with env.begin() as txn:
                names = list(txn.cursor().iternext(values=False))
        finally:
            env.close()
    except lmdb.Error as exc:
        raise BackupError(f"the copy does not open: {exc}") from None
    if not names:
        raise BackupError("the copy holds no databases")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
