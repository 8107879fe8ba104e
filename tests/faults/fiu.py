"""libfiu's POSIX preload (Debian's fiu-utils) under ``replika serve``: make its fsync, fdatasync or pwrite fail
with EIO on command, while it serves.

The preload wraps the libc calls of every library in the process, LMDB's included; the failure points are
switched on and off at run time through libfiu's control pipes (the protocol of fiu-ctrl and python3-fiu's
fiu_ctrl). Points used: ``posix/io/sync/fdatasync`` and ``posix/io/sync/fsync`` (LMDB syncs data.mdb with
fdatasync), ``posix/io/rw/pwrite`` (LMDB writes single page runs and the meta page with pwrite). Not ``write`` or
``writev``: the event loop writes to its sockets with them, so failing them fails the network, not the store.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.conftest import WAIT, ServerProcess

__all__ = ["FIU_LIBS", "FiuBroker"]

FIU_LIBS = Path("/usr/lib/fiu")


class FiuBroker(ServerProcess):
    """A :class:`ServerProcess` run under libfiu's preload, with its failure points under control."""

    def start(self) -> FiuBroker:
        preload = [FIU_LIBS / "fiu_run_preload.so", FIU_LIBS / "fiu_posix_preload.so"]
        assert all(p.exists() for p in preload), "libfiu is missing: run ./dev test (it installs fiu-utils)"
        self.fifo = self.data_dir.parent / "fiu-ctrl"
        env = {"LD_PRELOAD": " ".join(map(str, preload)), "FIU_CTRL_FIFO": str(self.fifo), "FIU_ENABLE": ""}
        with pytest.MonkeyPatch.context() as patch:  # ServerProcess passes os.environ on to the child
            for key, value in env.items():
                patch.setenv(key, value)
            super().start()
        return self

    def plain(self) -> ServerProcess:
        """The same broker without libfiu (after this one exited), to check what it left on disk."""
        return ServerProcess(self.data_dir, *self.args).start()

    def _control(self, line: str) -> None:
        assert self.proc is not None
        base = f"{self.fifo}-{self.proc.pid}"
        with open(base + ".in", "w") as pipe:  # libfiu's control fifos: one command per open
            pipe.write(line + "\n")
        with open(base + ".out") as pipe:
            answer = pipe.readline().strip()
        assert answer == "0", f"libfiu refused {line!r}: {answer!r}"

    def fail(self, point: str, *, once: bool = True, error: int = errno.EIO) -> None:
        """Make calls at ``point`` fail with ``error``: the next one only (``once``), or all until :meth:`heal`."""
        self._control(f"enable name={point},failnum=1,failinfo={error}" + (",onetime" if once else ""))

    def heal(self, point: str) -> None:
        self._control(f"disable name={point}")

    def wait_exit(self) -> int:
        """The broker's exit code, once it exits by itself (within WAIT seconds)."""
        assert self.proc is not None
        return self.proc.wait(WAIT)
