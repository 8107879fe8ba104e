"""``replika serve`` as a child process of a benchmark, on free ports, with its store under a work directory.

The broker is ready when its port file is written. Its admin sidecar loads its web stack after that, so a
benchmark that must not measure the loading (or count its memory) waits for it with
:meth:`BrokerProcess.wait_for_sidecar`.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerProcess", "start_broker"]


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None  # None without the sidecar
    started: float  # perf_counter() just before the process was started

    @property
    def url(self) -> str:
        return f"replika://127.0.0.1:{self.port}"

    def wait_for_sidecar(self) -> float:
        """Block until the admin sidecar answers ``/healthz``; return when it did (perf_counter). Its port is bound
        before the broker's port file is written, so the request waits in the backlog while it loads: no polling.
        Returns at once without a sidecar."""
        if self.admin_port is not None:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=60) as reply:
                if reply.status != 200:
                    raise SystemExit(f"bench: the admin sidecar answered {reply.status}")
        return time.perf_counter()


def start_broker(
    workdir: Path, *flags: str, admin: bool = True, log_level: str = "warning", timeout: float = 60.0
) -> BrokerProcess:
    """Start a broker storing under ``workdir / "store"`` (kept across starts: a restart finds its data) with
    extra ``flags``; return once it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, admin_file = workdir / "port", workdir / "admin-port"
    port_file.unlink(missing_ok=True)
    admin_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "replika_server", "serve", "--port", "0", "--data-dir", str(workdir / "store")]
    cmd += ["--port-file", str(port_file), "--log-level", log_level]
    cmd += ["--admin-port", "0", "--admin-port-file", str(admin_file)] if admin else ["--no-admin"]
    started = time.perf_counter()
    proc = subprocess.Popen([*cmd, *flags])
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench: the broker did not start (exit code {proc.wait()})")
        time.sleep(0.01)  # another process writes the file: nothing to await
    # Written before the port file, unless the flags turned the sidecar off.
    admin_port = int(admin_file.read_text()) if admin_file.exists() else None
    return BrokerProcess(proc, int(port_file.read_text()), admin_port, started)
