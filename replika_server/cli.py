"""The ``replika`` command line. ``replika serve`` runs the broker."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from replika_server import __version__
from replika_server.config import DEFAULT_PORT, Config, ConfigError
from replika_server.logs import configure_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replika", description="Replika: a durable message broker.")
    parser.add_argument("--version", action="version", version=f"replika {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every flag may also come from the REPLIKA_<FLAG> environment variable "
        "(e.g. REPLIKA_PORT, REPLIKA_DATA_DIR); a flag given on the command line wins.",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--data-dir", help="directory of the LMDB store (default ./replika-data)")
    serve.add_argument(
        "--durability",
        choices=("sync", "relaxed"),
        help="sync (default): fsync every group commit before confirming; relaxed: confirm once written to "
        "the OS, fsync every --sync-interval seconds",
    )
    serve.add_argument("--sync-interval", type=float, help="seconds between fsyncs in relaxed mode (default 1)")
    serve.add_argument("--max-frame", help="largest frame accepted, e.g. 16M (default 16 MiB)")
    serve.add_argument("--max-payload", help="largest message payload, e.g. 8M (default 8 MiB)")
    serve.add_argument("--max-batch", type=int, help="messages per publish/fetch/ack request (default 10000)")
    serve.add_argument("--max-store-size", help="largest the store may grow, e.g. 64G (default 64 GiB)")
    admin = serve.add_argument_group("admin sidecar (dashboard, admin API, /metrics)")
    admin.add_argument("--admin-port", type=int, help="HTTP port of the dashboard and admin API (default 8333)")
    admin.add_argument("--admin-host", help="address of the admin sidecar (default 127.0.0.1)")
    admin.add_argument("--no-admin", action="store_true", default=None, help="do not serve the admin sidecar")
    admin.add_argument("--admin-port-file", help="write the admin sidecar's bound port to this file (--admin-port 0)")
    admin.add_argument(
        "--admin-cors-origin",
        action="append",
        dest="admin_cors_origins",
        metavar="ORIGIN",
        help="a browser origin (e.g. https://ops.example.com) allowed to call the admin API; repeatable",
    )
    security = serve.add_argument_group("security (see SECURITY.md)")
    security.add_argument("--auth", metavar="FILE", help="TOML file of tokens and their permissions; SIGHUP reloads it")
    security.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow binding beyond loopback without --auth or --tls-client-ca (only on a trusted network)",
    )
    security.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    security.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca", metavar="FILE", help="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    limits = serve.add_argument_group("limits on what clients control")
    limits.add_argument("--max-connections", type=int, help="open connections; more are refused (default 4096)")
    limits.add_argument("--handshake-timeout", type=float, help="seconds to complete TLS and hello (default 10)")
    limits.add_argument(
        "--idle-timeout", type=float, help="close connections silent this many seconds; 0: never (default 300)"
    )
    limits.add_argument("--max-queues", type=int, help="queues the broker holds (default 10000)")
    limits.add_argument(
        "--queue-max-length", type=int, help="messages per queue unless declared otherwise; 0: unlimited (default)"
    )
    limits.add_argument(
        "--queue-max-bytes", help="stored bytes per queue unless declared otherwise, e.g. 1G; 0: unlimited (default)"
    )
    limits.add_argument(
        "--max-outbound", help="unread reply bytes per connection beyond which its fetches wait (default 8M)"
    )
    limits.add_argument(
        "--publish-rate", type=float, help="messages/s per token that sets none in --auth; 0: unlimited (default)"
    )
    limits.add_argument("--publish-burst", type=int, help="burst of --publish-rate (default: one second's worth)")
    serve.add_argument(
        "--no-text-protocol",
        dest="text_protocol",
        action="store_false",
        default=None,
        help="refuse the debug text protocol (lines typed with nc) on the broker port",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("auto", "json", "console"), help="auto: JSON unless on a TTY")
    serve.add_argument(
        "--port-file", help="write the bound port to this file once listening (for scripts using --port 0)"
    )
    bench = sub.add_parser(
        "bench",
        help="run the benchmark harness (from a source checkout)",
        description="Run the benchmark harness in bench/ of the source checkout; see `replika bench --help`.",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _bench(args: list[str]) -> int:
    """Hand over to ``bench/`` of the checkout this package was installed from (it is not an installed package,
    because it carries the peers' scripts and drivers that a broker deployment does not need)."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "__main__.py").exists():
        print("replika: the benchmark harness ships with the source checkout; run it from there", file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    harness = importlib.import_module("bench.__main__")  # not a static import: bench is not a package we ship
    return int(harness.main(args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every flag after it belongs to the harness, whose parser knows them
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "port_file", "admin_port_file", "no_admin")}
    if args.no_admin:
        flags["admin_port"] = "off"
    if args.admin_cors_origins:
        flags["admin_cors_origins"] = tuple(args.admin_cors_origins)
    try:
        config = Config.build(flags)
    except (ConfigError, TypeError) as exc:
        print(f"replika: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    import uvloop

    from replika_server.server import Server, run_server

    def report_port(server: Server) -> None:
        # The admin port first: a script waiting for the broker's port file may then read both.
        if args.admin_port_file and server.admin_port is not None:
            with open(args.admin_port_file, "w") as f:
                f.write(str(server.admin_port))
        if args.port_file:
            with open(args.port_file, "w") as f:
                f.write(str(server.port))

    async def serve() -> None:
        await run_server(config, on_ready=report_port)

    try:
        uvloop.run(serve())
    except ConfigError as exc:  # what only shows when starting: an unreadable auth file, an exposed bind
        print(f"replika: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        structlog.get_logger("replika").error("cannot_start", error=str(exc))
        return 1
    return 0
