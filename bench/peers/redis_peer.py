"""Redis (Streams) as a peer: ``appendonly yes`` with ``appendfsync always`` (fsync) or ``everysec`` (default)."""

from __future__ import annotations

from pathlib import Path

from bench.peers import PeerServer
from bench.peers._proc import HOST, Proc, free_port, probe, require_binary, run_text, wait_ready


def start(workdir: Path, fsync: bool) -> PeerServer:
    binary = require_binary("redis", "redis-server")
    text = run_text([binary, "--version"])  # "Redis server v=7.0.15 sha=... bits=64 ..."
    version = text.split("v=", 1)[1].split()[0] if "v=" in text else "?"
    port = free_port()
    datadir = workdir / f"redis-{'fsync' if fsync else 'default'}-{port}"
    datadir.mkdir(parents=True, exist_ok=True)
    appendfsync = "always" if fsync else "everysec"
    argv: list[str | Path] = [
        binary,
        "--bind", HOST,
        "--port", str(port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(datadir),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        # RDB snapshots off: durability is the AOF's job here, and a background save (fork + write of the whole
        # dataset) in the middle of a run would be noise, not the setting under test.
        "--save", "",
        "--logfile", "",  # log to stdout, i.e. the log file below
    ]  # fmt: skip
    proc = Proc("redis-server", argv, datadir / "redis.log", cwd=datadir)
    wait_ready(proc, lambda: probe(HOST, port, b"PING\r\n", lambda d: d.startswith(b"+PONG")), timeout=20.0)
    how = "fsync before each reply" if fsync else "default: fsync once a second"
    return PeerServer(
        "redis",
        HOST,
        port,
        fsync,
        version,
        f"redis-server {version}: Streams, AOF appendfsync {appendfsync} ({how}), RDB snapshots off",
        datadir,
        [proc],
    )
