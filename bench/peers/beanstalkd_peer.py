"""beanstalkd as a peer: binlog (``-b``) with ``-f 0`` (fsync every write) or its default ``-f 50``."""

from __future__ import annotations

from pathlib import Path

from bench.peers import PeerServer
from bench.peers._proc import HOST, Proc, free_port, probe, require_binary, run_text, wait_ready

# beanstalkd's default job size limit is 65,535 bytes; the harness sends payloads up to 1 MiB. Raise it to 8 MiB
# (as NATS's max_payload here). It is only a limit: nothing is allocated up front.
MAX_JOB_SIZE = 8 << 20


def start(workdir: Path, fsync: bool) -> PeerServer:
    binary = require_binary("beanstalkd", "beanstalkd")
    version = run_text([binary, "-v"]).split()[-1:] or ["?"]  # "beanstalkd 1.12"
    port = free_port()
    datadir = workdir / f"beanstalkd-{'fsync' if fsync else 'default'}-{port}"
    binlog = datadir / "binlog"
    binlog.mkdir(parents=True, exist_ok=True)
    argv: list[str | Path] = [binary, "-l", HOST, "-p", str(port), "-b", binlog, "-z", str(MAX_JOB_SIZE)]
    if fsync:
        argv += ["-f", "0"]  # "use -f0 for 'always fsync'": each binlog write is fsynced before the reply
    proc = Proc("beanstalkd", argv, datadir / "beanstalkd.log", cwd=datadir)
    wait_ready(proc, lambda: probe(HOST, port, b"stats\r\n", lambda d: d.startswith(b"OK ")), timeout=20.0)
    how = "-f 0: fsync every write" if fsync else "-f 50 (default): fsync at most every 50 ms"
    return PeerServer(
        "beanstalkd",
        HOST,
        port,
        fsync,
        version[0],
        f"beanstalkd {version[0]}: binlog, {how}",
        datadir,
        [proc],
    )
