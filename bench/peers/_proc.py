"""Process plumbing shared by the peers: free ports, binaries, readiness probes, a reliable stop."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.drivers.base import PeerUnavailable

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def find_binary(name: str, *extra: str | Path) -> Path | None:
    """``name`` on PATH, else in the sbin/bin dirs a non-root PATH may lack, else one of ``extra``."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for cand in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/local/bin/{name}", *extra):
        p = Path(cand)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def require_binary(peer: str, name: str, *extra: str | Path) -> Path:
    path = find_binary(name, *extra)
    if path is None:
        raise PeerUnavailable(f"{peer} not installed ({name} not found): run bench/peers/install.sh {peer}")
    return path


def run_text(argv: Sequence[str | Path], timeout: float = 20.0) -> str:
    """stdout+stderr of a short command ('' when it fails to run)."""
    try:
        out = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout + out.stderr).strip()


def version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+(?:\.\d+)+)", text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def probe(host: str, port: int, send: bytes, expect: Callable[[bytes], bool], timeout: float = 2.0) -> bool:
    """Connect, send ``send`` (may be empty), and check the first bytes that come back."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if send:
                s.sendall(send)
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if expect(data):
                    return True
            return False
    except OSError:
        return False


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class Proc:
    """One server process in its own process group, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.log = log
        self.stop_timeout = stop_timeout
        self.argv = [str(a) for a in argv]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: stop() can reach its children too
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise PeerUnavailable(
                f"{self.name} exited with code {self.popen.returncode} {what}; log {self.log}:\n{log_tail(self.log)}"
            )

    def stop(self) -> None:
        """SIGTERM, wait up to stop_timeout, then SIGKILL the whole process group; idempotent."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
        # Anything the server forked into its group (Erlang's helpers, for one) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def wait_ready(proc: Proc, ready: Callable[[], bool], timeout: float) -> None:
    """Poll ``ready`` until it holds; raise PeerUnavailable (after stopping the process) on exit or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.check_alive("during startup")
        except PeerUnavailable:
            proc.stop()
            raise
        if ready():
            return
        if time.monotonic() > deadline:
            proc.stop()
            raise PeerUnavailable(
                f"{proc.name} did not accept connections within {timeout:g} s; log {proc.log}:\n{log_tail(proc.log)}"
            )
        time.sleep(0.05)
