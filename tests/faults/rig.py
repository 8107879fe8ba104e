"""The power-loss rig: a broker whose data directory sits on the lazy filesystem (:mod:`tests.faults.lazyfs`),
and a power switch.

    with power_rig(tmp_path, "--durability", "sync") as rig:
        broker = rig.start()          # replika serve on the lazy mount
        ...load...
        report = rig.cut_power()      # unsynced writes dropped, broker kill -9'd, filesystem unmounted
        broker = rig.start()          # remounted, broker restarted on what was durable

Reusable for any change to what the broker syncs and when (a journal in front of LMDB, say): pass the flags to
test, drive load through ``rig.start().url``, call :meth:`PowerRig.cut_power` whenever, and check what comes back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WAIT, ServerProcess

__all__ = ["FUSE_DEVICE", "LazyMount", "PowerRig", "fuse_python", "power_rig", "require_fuse"]

FUSE_DEVICE = Path("/dev/fuse")
_DAEMON = Path(__file__).with_name("lazyfs.py")


@cache
def fuse_python() -> str | None:
    """An interpreter that can run the lazy filesystem: this one if it has pyfuse3 and trio, else Debian's
    (python3-pyfuse3 installs into the system interpreter, not into the project's virtual environment)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if not os.path.exists(python):
            continue
        probe = subprocess.run([python, "-c", "import pyfuse3, trio"], capture_output=True, check=False)
        if probe.returncode == 0:
            return python
    return None


def require_fuse() -> str:
    """The interpreter for the daemon. Skips only where /dev/fuse is missing; anything else missing is a failed
    set-up (``./dev test`` installs fuse3 and python3-pyfuse3), not a reason to prove nothing."""
    if not FUSE_DEVICE.exists():
        pytest.skip("/dev/fuse is missing: FUSE is unavailable here, so power loss cannot be simulated")
    python = fuse_python()
    assert python is not None, "pyfuse3 and trio are missing: run ./dev test (it installs python3-pyfuse3)"
    assert shutil.which("fusermount3") or os.geteuid() == 0, "fusermount3 is missing: apt-get install fuse3"
    return python


class LazyMount:
    """One mount of the lazy filesystem over ``backing`` at ``mountpoint``, and its control socket."""

    def __init__(self, backing: Path, mountpoint: Path, control: Path, log: Path) -> None:
        self.backing, self.mountpoint, self.control, self.log = backing, mountpoint, control, log
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        python = require_fuse()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)
        cmd = [python, str(_DAEMON), str(self.backing), str(self.mountpoint), str(self.control)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + WAIT
        while not (os.path.ismount(self.mountpoint) and self.control.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"lazyfs exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("lazyfs did not mount")
            time.sleep(0.01)  # another process mounts: nothing here to await
        assert self.command("ping") == "ok"

    def command(self, line: str) -> Any:
        """Send one control command (ping, stats, crash) and return its decoded answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(self.control))
            sock.sendall(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("lazyfs closed the control socket")
                reply += chunk
        return json.loads(reply)

    def unmount(self) -> None:
        if self.proc is None:
            return
        if os.path.ismount(self.mountpoint):
            tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
            subprocess.run([*tool, str(self.mountpoint)], check=True, capture_output=True, timeout=WAIT)
        self.proc.wait(WAIT)
        self.proc = None

    def force_unmount(self) -> None:
        """Teardown whatever state things are in: lazy unmount, then end the daemon."""
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True, timeout=WAIT)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(WAIT)
            self.proc = None


class PowerRig:
    """A broker on a lazy mount, restartable after a simulated power loss. See the module docstring."""

    def __init__(self, root: Path, *serve_args: str) -> None:
        self.root = root
        backing, locks = root / "backing", root / "locks"
        backing.mkdir(parents=True, exist_ok=True)
        locks.mkdir(exist_ok=True)
        # LMDB's lock file is a shared writable mmap of reader slots that LMDB rebuilds whenever it opens a store
        # nobody else has open: it is not durable state, and a lost power keeps nothing of it. Keeping it off the
        # lazy layer (the symlink resolves outside the mount) keeps its mmap traffic out of FUSE.
        link = backing / "lock.mdb"
        if not link.is_symlink():
            link.symlink_to(locks / "lock.mdb")
        self.mount = LazyMount(backing, root / "data", root / "lazyfs.sock", root / "lazyfs.log")
        self.serve_args = ("--no-admin", *serve_args)
        self.broker: ServerProcess | None = None
        self.cuts = 0

    @property
    def data_dir(self) -> Path:
        return self.mount.mountpoint

    def start(self) -> ServerProcess:
        """Mount (if not mounted) and start the broker on the mount; returns it (its ``url`` to connect to)."""
        if self.mount.proc is None:
            self.mount.mount()
        self.broker = ServerProcess(self.data_dir, *self.serve_args).start()
        return self.broker

    def stats(self) -> dict[str, Any]:
        """The lazy layer's counts: writes, fsyncs, writes pending (not yet durable) and their bytes."""
        return dict(self.mount.command("stats"))

    def cut_power(self) -> dict[str, Any]:
        """Lose power now: every write not yet synced is dropped at this instant (later ones fail with EIO),
        the broker is killed with SIGKILL, and the filesystem is unmounted so that no page cache remembers
        the dropped writes. Returns what was dropped (``dropped_writes``, ``dropped_bytes``, ``files``)."""
        report = dict(self.mount.command("crash"))
        if self.broker is not None:
            self.broker.kill()
        self.mount.unmount()
        self.cuts += 1
        return report

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        self.mount.force_unmount()


@contextlib.contextmanager
def power_rig(root: Path, *serve_args: str) -> Iterator[PowerRig]:
    """A :class:`PowerRig` in ``root`` with ``replika serve`` flags ``serve_args``; torn down on exit."""
    rig = PowerRig(root, *serve_args)
    try:
        yield rig
    finally:
        rig.close()
