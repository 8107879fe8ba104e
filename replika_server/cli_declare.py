"""``replika declare QUEUE``: create a queue or replace its options, through the SDK's ``declare``, with a flag
per option it takes (durations as seconds or with a unit: 30s, 15m, 12h, 7d; sizes as bytes or with a unit)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from replika_server.units import ConfigError, parse_duration, parse_size

if TYPE_CHECKING:
    import replika

__all__ = ["add_declare", "positive"]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (also the other client commands' counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _factor(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_declare(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """Add ``declare`` with ``command(name, help, description)``, the client commands' parser factory."""
    p = command(
        "declare",
        "create a queue or set its options",
        "Create QUEUE, or replace its options as a whole: an option not given goes back to its default (as the "
        "SDK's declare does). Durations are seconds or a number with a unit (250ms, 30s, 15m, 12h, 7d); sizes "
        "are bytes or a number with a unit (64M, 1G). Prints nothing; 'replika stats QUEUE' shows the options.",
    )
    p.add_argument(
        "--max-attempts", type=positive, metavar="N", help="deliveries before dead-lettering (default: no limit)"
    )
    p.add_argument("--dead-letter", metavar="QUEUE", help="the dead-letter queue (default QUEUE.dlq)")
    p.add_argument("--max-length", type=positive, metavar="N", help="most messages the queue holds")
    p.add_argument("--max-bytes", type=_size, metavar="SIZE", help="most payload and header bytes it holds")
    p.add_argument("--overflow", choices=("reject", "drop_oldest", "dead_letter"), help="past a limit (default reject)")
    p.add_argument("--retry-delay", type=_duration, metavar="DURATION", help="before a nacked message is ready again")
    p.add_argument("--retry-backoff", type=_factor, metavar="FACTOR", help="retry delay factor per attempt (default 2)")
    p.add_argument("--retry-max-delay", type=_duration, metavar="DURATION", help="longest retry delay (default 30d)")
    p.add_argument("--message-ttl", type=_duration, metavar="DURATION", help="longest a message may live")
    p.add_argument(
        "--expired", choices=("dead_letter", "drop"), help="what an expired message does (default dead_letter)"
    )
    p.add_argument("--dedup-window", type=_duration, metavar="DURATION", help="how long dedup ids count (default 120s)")
    h = p.add_argument_group("history (each --history-* flag turns it on)")
    h.add_argument("--history", action="store_true", help="record each message's life (replika trace, history)")
    h.add_argument(
        "--history-retention", type=_duration, metavar="DURATION", help="kept after a message ends (default 7d)"
    )
    h.add_argument("--history-max", type=positive, metavar="N", help="most messages with a history (default 100000)")
    h.add_argument("--history-payloads", action="store_true", help="keep payloads too (default: headers only)")
    p.set_defaults(client_command=_declare)


_OPTIONS = (
    "max_attempts",
    "dead_letter",
    "max_length",
    "max_bytes",
    "overflow",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "message_ttl",
    "expired",
    "dedup_window",
)


def _history(args: argparse.Namespace) -> bool | dict[str, Any]:
    history: dict[str, Any] = {}
    if args.history_retention is not None:
        history["retention"] = args.history_retention
    if args.history_max is not None:
        history["max_messages"] = args.history_max
    if args.history_payloads:
        history["payloads"] = True
    return history or args.history


def _declare(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    client.declare(args.queue, history=_history(args), **{name: getattr(args, name) for name in _OPTIONS})
