"""RabbitMQ as a peer: a private node (own name, ports, data, logs, cookie, epmd) bound to 127.0.0.1.

Durable classic queue + persistent messages + publisher confirms: RabbitMQ confirms a persistent message routed
to a durable queue only once it is written and fsynced to disk, and that is its default; there is no
per-write fsync knob to turn, so ``fsync=True`` and ``fsync=False`` start the same configuration.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from bench.drivers.base import PeerUnavailable
from bench.peers import PeerServer
from bench.peers._proc import HOST, Proc, find_binary, free_port, listening, probe, wait_ready

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's; /usr/sbin's wrapper would su to user rabbitmq
BOOT_TIMEOUT = 60.0  # RabbitMQ takes several seconds to boot on a 2-core machine
# AMQP 0-9-1 protocol header; a ready broker answers with a Connection.Start method frame (type 1, channel 0).
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def _versions() -> tuple[str, str]:
    rabbit = "?"
    with contextlib.suppress(OSError):
        # .../lib/rabbitmq_server-3.10.8/sbin/rabbitmq-server
        name = SERVER.resolve().parent.parent.name
        rabbit = name.split("-", 1)[1] if "-" in name else "?"
    otp = "?"
    for f in sorted(Path("/usr/lib/erlang/releases").glob("*/OTP_VERSION")):
        with contextlib.suppress(OSError):
            otp = f.read_text().strip()
    return rabbit, otp


def start(workdir: Path, fsync: bool) -> PeerServer:
    server = SERVER if SERVER.exists() else find_binary("rabbitmq-server")
    epmd = find_binary("epmd", "/usr/lib/erlang/bin/epmd")
    if server is None or epmd is None:
        raise PeerUnavailable("rabbitmq not installed (rabbitmq-server not found): run bench/peers/install.sh rabbitmq")
    rabbit, otp = _versions()
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    datadir = workdir / f"rabbitmq-{'fsync' if fsync else 'default'}-{port}"
    home, mnesia, logs = datadir / "home", datadir / "mnesia", datadir / "log"
    for d in (home, mnesia, logs):
        d.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    (datadir / "enabled_plugins").write_text("[].\n")  # no management (or any other) plugin
    (datadir / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = {HOST}:{port}\n"
        "loopback_users.guest = true\n"  # guest/guest, from loopback only (the default)
        "log.console = true\n"
        "log.console.level = warning\n"
        "log.file.level = info\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"}
    env.update(
        HOME=str(home),  # where the Erlang cookie is read from
        RABBITMQ_NODENAME=f"bench{port}@localhost",
        RABBITMQ_NODE_IP_ADDRESS=HOST,
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(mnesia),
        RABBITMQ_LOG_BASE=str(logs),
        RABBITMQ_CONFIG_FILE=str(datadir / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(datadir / "advanced.config"),  # absent: none
        RABBITMQ_CONF_ENV_FILE=str(datadir / "rabbitmq-env.conf"),  # absent: ignore /etc/rabbitmq/rabbitmq-env.conf
        RABBITMQ_ENABLED_PLUGINS_FILE=str(datadir / "enabled_plugins"),
        # Erlang distribution on loopback only, found through our own epmd (not a system-wide one on 0.0.0.0).
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        ERL_EPMD_ADDRESS=HOST,
        ERL_EPMD_PORT=str(epmd_port),
        # Makes the start script exec the Erlang VM directly instead of running it under a shell that turns
        # SIGTERM into `rabbitmqctl stop`: the VM itself shuts down cleanly on SIGTERM.
        RUNNING_UNDER_SYSTEMD="true",
    )
    procs: list[Proc] = []
    try:
        epmd_proc = Proc(
            "epmd", [epmd, "-address", HOST, "-port", str(epmd_port)], logs / "epmd.log", env=env, stop_timeout=5.0
        )
        procs.append(epmd_proc)
        wait_ready(epmd_proc, lambda: listening(HOST, epmd_port), 10.0)
        node = Proc("rabbitmq-server", [server], logs / "console.log", env=env, cwd=datadir, stop_timeout=30.0)
        procs.append(node)
        wait_ready(node, lambda: probe(HOST, port, AMQP_HEADER, lambda d: len(d) >= 7 and d[0] == 1), BOOT_TIMEOUT)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return PeerServer(
        "rabbitmq",
        HOST,
        port,
        fsync,
        rabbit,
        f"RabbitMQ {rabbit} (Erlang/OTP {otp}): durable classic queue, persistent messages, publisher confirms "
        "(confirmed after fsync; the default, same in both settings)",
        datadir,
        procs,
        ["RabbitMQ: fsync and default settings are the same (persistent + confirmed is always fsynced)"],
    )
