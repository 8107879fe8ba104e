"""The ``replika`` command line: ``serve`` runs the broker, ``backup`` copies its store while it serves, the
client commands (:mod:`replika_server.cli_client`) talk to a broker, ``bench`` runs the benchmark harness.

Exit codes are the same for every command: see :data:`replika_server.cli_client.EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from replika_server import __version__, cli_client
from replika_server.cli_client import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STORE_FAILED,
    EXIT_USAGE,
)
from replika_server.config import DEFAULT_PORT, Config, ConfigError, load_config_file, render_toml
from replika_server.logs import configure_logging

__all__ = ["build_parser", "main", "serve_flags"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``replika`` command (``bench`` passes its arguments on to the harness)."""
    parser = argparse.ArgumentParser(
        prog="replika",
        description="Replika: a durable message broker.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"replika {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_backup(sub)
    _add_restore(sub)
    cli_client.add_commands(sub)
    bench = sub.add_parser(
        "bench",
        help="run the benchmark harness (from a source checkout)",
        description="Run the benchmark harness in bench/ of the source checkout; see `replika bench --help`.",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every setting comes, in this order of precedence, from its flag, from the "
        "REPLIKA_<SETTING> environment variable (REPLIKA_PORT, REPLIKA_DATA_DIR, ...), from the TOML file of "
        "--config (keys named as the settings: port, data_dir, ...), or its default. --print-config shows the "
        "result as such a file.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--config", metavar="FILE", help="TOML file of settings (default $REPLIKA_CONFIG); flags and environment win"
    )
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as a TOML file for --config, each with where it came from, and exit",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--data-dir", help="directory of the LMDB store (default ./replika-data)")
    serve.add_argument(
        "--store",
        metavar="URL",
        help="where messages live: a directory or lmdb:///path (the embedded LMDB store; default: --data-dir)",
    )
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
        "--log-stream", choices=("stderr", "stdout"), help="where logs go (default stderr; stdout in containers)"
    )
    serve.add_argument(
        "--port-file", help="write the bound port to this file once listening (for scripts using --port 0)"
    )


def _add_backup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser(
        "backup",
        help="copy the store while the broker serves",
        description="Write a consistent copy of the store to DIR (new or empty) while the broker keeps serving: "
        "every message whose publish was confirmed before the backup began, compacted. It reads the data "
        "directory directly (LMDB lets a reader in another process see one committed snapshot while the broker "
        "writes), so run it on the broker's host as a user who can open the store (docker exec, kubectl exec, "
        "sudo -u replika). Restore: replika serve --data-dir DIR.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    backup.add_argument("dir", metavar="DIR", help="where to write the copy (created; must be empty if it exists)")
    backup.add_argument(
        "--data-dir", help="the broker's store (default as for serve: $REPLIKA_DATA_DIR, --config, ./replika-data)"
    )
    backup.add_argument("--store", metavar="URL", help="the broker's --store, instead of --data-dir")
    backup.add_argument("--config", metavar="FILE", help="take data_dir (or store) from this serve config file")


def _add_restore(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    restore = sub.add_parser(
        "restore",
        help="make a backup the store of a data directory",
        description="Copy the backup in BACKUP (made by replika backup) into the data directory, which must not "
        "be in use: while a broker serves it, this refuses (exit 2) and changes nothing. A data directory that "
        "already holds a store is only replaced with --force. Then start the broker on it. (Serving the backup "
        "directory itself, replika serve --data-dir BACKUP, works too.)",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restore.add_argument("backup", metavar="BACKUP", help="the directory replika backup wrote")
    restore.add_argument("--data-dir", help="the store to restore into (default as for serve)")
    restore.add_argument("--store", metavar="URL", help="the broker's --store, instead of --data-dir")
    restore.add_argument("--config", metavar="FILE", help="take data_dir (or store) from this serve config file")
    restore.add_argument("--force", action="store_true", help="replace the store the data directory holds")


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
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "backup":
        return _backup(args)
    if args.command == "restore":
        return _restore(args)
    return cli_client.run(args)


def serve_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``replika serve``'s parsed ``args`` give, by :class:`Config` field (None: not given)."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    if args.no_admin:
        flags["admin_port"] = "off"
    if args.admin_cors_origins:
        flags["admin_cors_origins"] = tuple(args.admin_cors_origins)
    return flags


def _load(args: argparse.Namespace, flags: dict[str, Any]) -> tuple[Config, dict[str, str], str | None]:
    config_file = args.config or os.environ.get("REPLIKA_CONFIG") or None
    file = load_config_file(Path(config_file)) if config_file else None
    config, origins = Config.build_with_origins(flags, file=file)
    return config, origins, config_file


def _serve(args: argparse.Namespace) -> int:
    try:
        config, origins, config_file = _load(args, serve_flags(args))
    except (ConfigError, TypeError) as exc:
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        if config_file:
            sys.stdout.write(f"# with config file {config_file}\n")
        sys.stdout.write(render_toml(config, origins))
        return EXIT_OK
    configure_logging(config.log_level, config.log_format, config.log_stream)
    import uvloop

    from replika_server.node import Node, run
    from replika_server.store import StoreError, StoreInUse

    def report_port(server: Node) -> None:
        # The admin port first: a script waiting for the broker's port file may then read both.
        if config.admin_port_file is not None and server.admin_port is not None:
            config.admin_port_file.write_text(str(server.admin_port))
        if config.port_file is not None:
            config.port_file.write_text(str(server.port))

    async def serve() -> None:
        await run(config, on_ready=report_port)

    try:
        uvloop.run(serve())
    except (ConfigError, StoreInUse) as exc:  # what only shows when starting: an unreadable auth file, an
        # exposed bind, a data directory another broker owns
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        structlog.get_logger("replika").error("cannot_start", error=str(exc))
        return EXIT_ERROR
    except StoreError as exc:  # run's STORE_FAILED, raised once in-flight requests were answered
        structlog.get_logger("replika").critical("exiting", code=exc.code, error=str(exc), exit_code=EXIT_STORE_FAILED)
        return EXIT_STORE_FAILED
    return EXIT_OK


def _backup(args: argparse.Namespace) -> int:
    from replika_server import store  # the engine's modules load only for this command

    try:
        config = _load(args, {"data_dir": args.data_dir, "store": args.store})[0]
    except (ConfigError, TypeError) as exc:
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = store.backup(config.store_url, Path(args.dir))
    except store.BackupError as exc:
        print(f"replika: backup failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"{result.path}: {result.size} bytes, copied from {config.store_url} in {result.seconds:.2f} s")
    return EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    from replika_server import store

    try:
        config = _load(args, {"data_dir": args.data_dir, "store": args.store})[0]
    except (ConfigError, TypeError) as exc:
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = store.restore(Path(args.backup), config.store_url, force=args.force)
    except (store.StoreInUse, store.StoreExists) as exc:  # a mistake the user can correct: nothing was changed
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except store.BackupError as exc:
        print(f"replika: restore failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{result.path}: {result.size} bytes, restored from {args.backup} in {result.seconds:.2f} s")
    return EXIT_OK
