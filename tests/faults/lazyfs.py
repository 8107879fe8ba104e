"""A "lazy" passthrough FUSE filesystem for power-loss tests, after LazyFS: it loses what was never synced.

Run as ``python lazyfs.py BACKING MOUNTPOINT CONTROL_SOCKET`` with an interpreter that has pyfuse3 and trio
(Debian's python3-pyfuse3; :mod:`tests.faults.rig` picks one). Every operation passes through to BACKING, and
every write or truncation that no fsync/fdatasync (msync and O_SYNC/O_DSYNC writes arrive as fsyncs, or as writes
on a handle opened with O_DSYNC) has made durable yet is remembered in an undo log: the bytes and the file size
it replaced. On the control socket's ``crash`` command the undo log is played backwards, so BACKING holds exactly
what was durable, and from then on every change fails with EIO: the disk lost power. Unmounting then drops the
kernel's page cache, which still shows the lost writes; a new mount over BACKING is the machine after reboot.

Modelled: lost file data and lost size changes (writes past the end, truncations). Not modelled: lost directory
entries (create, rename and unlink are durable at once; LMDB creates its two files once and never renames), torn
writes within one write call (a write is all there or all gone), reordering inside the device. Locks (fcntl and
flock) are left to the kernel, which handles them on the mount when the filesystem implements none, so they work
between processes of this machine as on a local disk.

Control commands, one line each, answered with one line: ``ping`` -> ``ok``; ``stats`` -> JSON counts;
``crash`` -> JSON with what was dropped.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

# An entry is (seq, offset, bytes it overwrote, file size before it, bytes written). seq orders entries across
# files, so the crash undoes them newest first and overlapping writes come back to the oldest durable bytes.
Undo = tuple[int, int, bytes, int, int]


class LazyFS(pyfuse3.Operations):  # type: ignore[misc]
    """See the module docstring. Inode numbers are the backing files' (the root's is pyfuse3.ROOT_INODE)."""

    def __init__(self, backing: Path) -> None:
        super().__init__()
        self._root = str(backing)
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: self._root}
        self._fds: dict[int, tuple[int, int, bool]] = {}  # fh (the backing fd) -> (inode, fd, O_DSYNC handle)
        self._undo: dict[int, list[Undo]] = {}
        self._seq = 0
        self.crashed = False
        self.counts = {"writes": 0, "fsyncs": 0, "durable_writes": 0}

    # ------------------------------------------------------------------------------------------------ control
    def stats(self) -> dict[str, Any]:
        entries = [e for log in self._undo.values() for e in log]
        pending = {"pending": len(entries), "pending_bytes": sum(e[4] for e in entries)}
        return {**self.counts, **pending, "crashed": self.crashed}

    def crash(self) -> dict[str, Any]:
        """Undo every write not made durable, newest first, and refuse every change from now on."""
        entries = sorted(((e, inode) for inode, log in self._undo.items() for e in log), reverse=True)
        dropped: dict[str, Any] = {"dropped_writes": len(entries), "dropped_bytes": sum(e[4] for e, _ in entries)}
        dropped["files"] = []
        fds: dict[int, int] = {}
        try:
            for (_seq, offset, old, size, _length), inode in entries:
                if inode not in fds:
                    fds[inode] = os.open(self._paths[inode], os.O_RDWR)
                    dropped["files"].append(os.path.relpath(self._paths[inode], self._root))
                fd = fds[inode]
                os.pwrite(fd, old, offset)
                os.ftruncate(fd, size)
            for fd in fds.values():
                os.fsync(fd)  # the backing disk really is durable: a later mount must see the undone state
        finally:
            for fd in fds.values():
                os.close(fd)
        self._undo.clear()
        self.crashed = True
        return dropped

    def _change(self) -> None:
        if self.crashed:
            raise pyfuse3.FUSEError(errno.EIO)

    def _remember(self, inode: int, fd: int, offset: int, length: int) -> None:
        size = os.fstat(fd).st_size
        old = os.pread(fd, max(0, min(length, size - offset)), offset) if offset < size else b""
        self._seq += 1
        self._undo.setdefault(inode, []).append((self._seq, offset, old, size, length))

    # ------------------------------------------------------------------------------------------------ names
    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        attrs = pyfuse3.EntryAttributes()
        inode = pyfuse3.ROOT_INODE if path == self._root else st.st_ino
        self._paths[inode] = path
        attrs.st_ino = inode
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks"):
            setattr(attrs, name, getattr(st, name))
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        attrs.entry_timeout = attrs.attr_timeout = 1.0
        return attrs

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    async def forget(self, inode_list: Any) -> None:
        pass  # inode numbers are the backing files' own: nothing to free

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(st, name))
        out.f_namemax = st.f_namemax
        return out

    # ------------------------------------------------------------------------------------------------ dirs
    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for i, name in enumerate(names[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(os.path.join(path, name)), i):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._change()
        path = self._child(parent_inode, name)
        _os(os.mkdir, path, mode)
        return self._attrs(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._change()
        _os(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._change()
        path = self._child(parent_inode, name)
        inode = os.lstat(path).st_ino
        _os(os.unlink, path)
        self._undo.pop(inode, None)  # the file is gone, durably: nothing of it to bring back

    async def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int, ctx: Any) -> None:
        self._change()
        src, dst = self._child(old_parent, old), self._child(new_parent, new)
        _os(os.rename, src, dst)
        self._attrs(dst)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._change()
        path = self._child(parent_inode, name)
        _os(os.symlink, target, path)
        return self._attrs(path)

    # ------------------------------------------------------------------------------------------------ files
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            self._truncate(inode, path, attr.st_size)
        if fields.update_mode:
            _os(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _os(os.chown, path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _os(os.utime, path, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(path)

    def _truncate(self, inode: int, path: str, length: int) -> None:
        self._change()
        fd = _os(os.open, path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self._remember(inode, fd, length, max(0, size - length))
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def _open_fd(self, inode: int, path: str, flags: int, mode: int = 0o644) -> pyfuse3.FileInfo:
        # Read-write whatever was asked, so that a write on a write-only handle can read what it replaces.
        # O_DSYNC/O_SYNC are this layer's to honour (see write), not the backing disk's.
        sync = bool(flags & (os.O_DSYNC | os.O_SYNC))
        backing = (flags & ~(os.O_ACCMODE | os.O_DSYNC | os.O_SYNC | os.O_APPEND)) | os.O_RDWR
        fd = _os(os.open, path, backing, mode)
        self._fds[fd] = (inode, fd, sync)
        return pyfuse3.FileInfo(fh=fd, keep_cache=False)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        path = self._path(inode)
        if flags & os.O_TRUNC:  # libfuse passes O_TRUNC on to open (atomic_o_trunc) rather than as a setattr
            self._truncate(inode, path, 0)
        return self._open_fd(inode, path, flags & ~os.O_TRUNC)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._change()
        path = self._child(parent_inode, name)
        fd = _os(os.open, path, os.O_CREAT | os.O_RDWR | (flags & os.O_EXCL), mode)
        os.close(fd)
        attrs = self._attrs(path)
        return self._open_fd(attrs.st_ino, path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC), mode), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._change()
        inode, fd, sync = self._fds[fh]
        self.counts["writes"] += 1
        if sync:
            self.counts["durable_writes"] += 1
        else:
            self._remember(inode, fd, off, len(buf))
        return _os(os.pwrite, fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._change()
        inode = self._fds[fh][0]
        self.counts["fsyncs"] += 1
        self._undo.pop(inode, None)  # everything written to this file so far is durable now

    async def flush(self, fh: int) -> None:
        pass  # close() promises nothing about durability, so neither does this

    async def release(self, fh: int) -> None:
        self._fds.pop(fh, None)
        os.close(fh)


def _os(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None


async def _control(fs: LazyFS, path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path + ".new")
    sock.listen(8)
    os.rename(path + ".new", path)  # the path appears only once it is listening: the rig waits for it

    async def serve(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                command = line.decode().strip()
                if command == "ping":
                    reply: Any = "ok"
                elif command == "stats":
                    reply = fs.stats()
                elif command == "crash":
                    reply = fs.crash()
                else:
                    reply = {"error": f"unknown command {command!r}"}
                await stream.send_all((json.dumps(reply) + "\n").encode())

    await trio.serve_listeners(serve, [trio.SocketListener(sock)])


async def _main(fs: LazyFS, control: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_control, fs, control)
        await pyfuse3.main()  # returns when the filesystem is unmounted
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    backing, mountpoint, control = argv
    fs = LazyFS(Path(backing))
    options = set(pyfuse3.default_options) | {"fsname=lazyfs"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(_main, fs, control)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main(sys.argv[1:])
