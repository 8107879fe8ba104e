"""The ``replika`` commands that talk to a running broker: publish, consume, peek, queues, stats, declare, purge,
delete, redrive, trace, history (declare in :mod:`replika_server.cli_declare`). Each opens one blocking
:class:`replika.Client` to ``--url`` (or ``REPLIKA_URL``) with ``--token`` (or ``REPLIKA_TOKEN``), does its work
and exits with a code a script can trust (see :data:`EXIT_CODES`).

What goes to standard output is the data and nothing else (payloads, ids, counts, JSON); errors go to standard
error as ``replika: CODE: message``, with the broker's stable error code.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol

from replika_server.cli_declare import add_declare
from replika_server.cli_declare import positive as _positive

if TYPE_CHECKING:
    import replika

__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPE",
    "EXIT_STORE_FAILED",
    "EXIT_USAGE",
    "add_commands",
    "run",
]

EXIT_OK = 0
EXIT_ERROR = 1  # the broker refused (its code on stderr), the connection failed, serve or backup failed
EXIT_USAGE = 2  # bad arguments or settings (argparse's own code for them)
EXIT_STORE_FAILED = 74  # serve: the store failed a write or fsync (sysexits' EX_IOERR); restart to recover
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_PIPE = 141  # standard output closed by its reader (`| head`), as a shell reports SIGPIPE
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_ERROR}    failed: the broker refused (stderr: "replika: CODE: message", CODE as in SPEC.md) or
       cannot be reached; serve could not listen; backup could not copy
  {EXIT_USAGE}    bad usage: unknown flag, missing argument, invalid URL, invalid setting or config file
  {EXIT_STORE_FAILED}   serve: the store failed a write or fsync (STORE_FAILED); what was in flight was answered,
       nothing unsynced was confirmed; restart it (LMDB reopens at its last durable commit)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_PIPE}  standard output was closed early (e.g. piped into head)"""

DEFAULT_URL = "replika://127.0.0.1:8777"
#: Messages per fetch when no --count bounds it: enough to amortise round trips, few enough that a consumer
#: stopped mid-batch (Ctrl-C) leaves little printed-but-unacked work to be delivered again.
_FETCH_BATCH = 100
#: Long-poll seconds of one fetch when consume waits for ever (the broker caps a wait at 300 s).
_POLL = 30.0


class _Peeked(Protocol):
    id: int
    attempts: int
    published_at: float
    payload: bytes
    headers: dict[str, str]


# ------------------------------------------------------------------------------------------------ parsers
def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400 * 365:
        raise argparse.ArgumentTypeError(f"out of range: {value}")
    return value


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    return key, value


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not unix seconds or an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to ``sub``, the ``replika`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument("--url", help=f"broker URL, replika:// or replikas:// (default $REPLIKA_URL, else {DEFAULT_URL})")
    conn.add_argument("--token", help="secret of an --auth token (default $REPLIKA_TOKEN; prefer it: flags show in ps)")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=description,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("queue", metavar="QUEUE" if name != "redrive" else "DLQ")
        return p

    p = command(
        "publish",
        "publish messages",
        "Publish DATA as one message, or each line of standard input (without its line ending) as one message "
        "when DATA is omitted or '-'. Prints each message's id, one per line, once the broker confirms it "
        "durably stored.",
    )
    p.add_argument("data", nargs="?", metavar="DATA", help="the payload (UTF-8); omitted or '-': standard input")
    p.add_argument(
        "-H", "--header", action="append", type=_header, metavar="KEY=VALUE", help="a header on every message"
    )
    p.set_defaults(client_command=_publish)

    p = command(
        "consume",
        "receive, print and acknowledge messages",
        "Print each message's payload on its own line (or, with --json, one JSON object per line with id, attempts, "
        "published_at, headers, payload and encoding), then acknowledge it. Without --count and --wait it runs "
        "until interrupted. Acknowledgement follows printing: a message printed when the command is "
        "interrupted may be delivered again (at-least-once).",
    )
    p.add_argument("--count", type=_positive, metavar="N", help="stop after N messages")
    p.add_argument("--wait", type=_seconds, metavar="S", help="stop when no message arrives for S seconds")
    p.add_argument(
        "--no-ack",
        dest="ack",
        action="store_false",
        help="leave messages unacknowledged: each stays leased to this command until it exits (or its --lease "
        "ends, when it may be printed again), then is ready again; each delivery counts as an attempt (peek "
        "looks without delivering)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of raw payloads")
    p.add_argument("--lease", type=_seconds, default=30.0, metavar="S", help="lease of each delivery (default 30)")
    p.set_defaults(client_command=_consume)

    p = command(
        "peek",
        "show ready messages without delivering them",
        "Print the first ready messages of QUEUE without leasing them: no attempt is counted.",
    )
    p.add_argument("--max", type=_positive, default=10, metavar="N", help="at most N messages (default 10)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of raw payloads")
    p.set_defaults(client_command=_peek)

    p = sub.add_parser(
        "queues",
        parents=[common],
        help="list queues and their counts",
        description="A table of every queue the token may see with its counts; --json for a JSON array.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="a JSON array of the queues' stats")
    p.set_defaults(client_command=_queues)

    p = command("stats", "show one queue's counts and options", "Print QUEUE's stats as 'key: value' lines.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(client_command=_stats)

    add_declare(command)

    p = command(
        "purge", "delete a queue's ready messages", "Delete every message of QUEUE that is not leased; print how many."
    )
    p.set_defaults(client_command=_purge)

    p = command("delete", "delete a queue", "Delete QUEUE and every message in it.")
    p.set_defaults(client_command=_delete)

    p = command(
        "redrive",
        "move dead letters back",
        "Move the messages of the dead-letter queue DLQ back to the queue they were dead-lettered from (or to "
        "--to QUEUE); print how many moved.",
    )
    p.add_argument("--to", metavar="QUEUE", help="the queue to move them to (default: where each came from)")
    p.add_argument("--max", type=_positive, metavar="N", help="move at most N messages")
    p.set_defaults(client_command=_redrive)

    p = command(
        "trace",
        "show one message's recorded life",
        "Print the timeline of message ID of QUEUE (a queue declared with history): one line per event, oldest "
        "first, with its UTC time, kind, attempt, connection and details.",
    )
    p.add_argument("id", type=_positive, metavar="ID")
    p.add_argument("--json", action="store_true", help="one JSON object: the message and its events")
    p.set_defaults(client_command=_trace)

    p = command(
        "history",
        "list recent messages with their final state",
        "Print the messages of QUEUE with a recorded history, newest first: id, published time, state, events.",
    )
    p.add_argument("--state", metavar="STATE", help="only those in STATE (waiting, in_flight, acked, dead_lettered...)")
    p.add_argument("--since", type=_when, metavar="TIME", help="published at or after TIME (unix s or ISO 8601)")
    p.add_argument("--until", type=_when, metavar="TIME", help="published at or before TIME (unix s or ISO 8601)")
    p.add_argument("--header", type=_header, metavar="KEY=VALUE", help="only those with this header")
    p.add_argument("--max", type=_positive, default=100, metavar="N", help="at most N messages (default 100)")
    p.add_argument("--json", action="store_true", help="JSON lines, one message (with its events) per line")
    p.set_defaults(client_command=_history)


# ------------------------------------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    """Run the client command ``args`` names; return the exit code."""
    import replika  # the SDK (and asyncio with it) loads only for the commands that need it

    url = args.url or os.environ.get("REPLIKA_URL") or DEFAULT_URL
    token = args.token or os.environ.get("REPLIKA_TOKEN") or None
    try:
        client = replika.Client(url, token, client_name="replika-cli")
    except ValueError as exc:  # an unusable URL
        print(f"replika: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            args.client_command(client, args, sys.stdout.buffer)
        sys.stdout.flush()
    except replika.ReplikaError as exc:
        print(f"replika: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Nothing more can be printed; keep the interpreter's last flush from complaining on stderr.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _publish(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    headers = dict(args.header) if args.header else None
    if args.data is not None and args.data != "-":
        # fsencode gives back the argument's own bytes, even those that are not UTF-8.
        out.write(b"%d\n" % client.publish(args.queue, os.fsencode(args.data), headers=headers))
        return
    for lines in _stdin_lines(sys.stdin.fileno()):
        ids = client.publish_many(args.queue, lines, headers=None if headers is None else [headers] * len(lines))
        out.write(b"".join(b"%d\n" % i for i in ids))
        out.flush()


def _stdin_lines(fd: int) -> Iterator[list[bytes]]:
    """Lines of ``fd`` without their ending, in batches of what each read returned: a pipe fed fast gives big
    batches (one publish each), a person typing gives one line at a time, confirmed at once."""
    pending = bytearray()
    while chunk := os.read(fd, 1 << 16):
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0:
            continue
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        yield [line.removesuffix(b"\r") for line in lines]
    if pending:
        yield [bytes(pending).removesuffix(b"\r")]


def _consume(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    got = 0
    idle_since = time.monotonic()
    while args.count is None or got < args.count:
        want = _FETCH_BATCH if args.count is None else min(args.count - got, _FETCH_BATCH)
        wait = _POLL if args.wait is None else max(0.0, args.wait - (time.monotonic() - idle_since))
        msgs = client.fetch(args.queue, max=want, wait=wait, lease=args.lease)
        if not msgs:
            if args.wait is not None and time.monotonic() - idle_since >= args.wait:
                return
            continue
        for msg in msgs:
            _print_message(out, msg, args.json)
        out.flush()
        if args.ack:
            client.ack(msgs)
        got += len(msgs)
        idle_since = time.monotonic()


def _peek(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    for msg in client.peek(args.queue, max=args.max):
        _print_message(out, msg, args.json)


def _print_message(out: IO[bytes], msg: _Peeked, as_json: bool) -> None:
    if not as_json:
        out.write(msg.payload + b"\n")
        return
    try:
        payload, encoding = bytes(msg.payload).decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(msg.payload).decode("ascii"), "base64"
    record = {
        "id": msg.id,
        "attempts": msg.attempts,
        "published_at": msg.published_at,
        "headers": msg.headers,
        "payload": payload,
        "encoding": encoding,
    }
    out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")


#: Columns of ``replika queues``: heading and stats key.
_COLUMNS = (
    ("QUEUE", "queue"),
    ("READY", "ready"),
    ("IN_FLIGHT", "in_flight"),
    ("DELAYED", "delayed"),
    ("TOTAL", "total"),
    ("BYTES", "bytes"),
    ("DEAD_LETTER", "dead_letter"),
)


def _queues(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    rows = sorted(client.queues(), key=lambda row: str(row["queue"]))
    if args.json:
        out.write(json.dumps(rows).encode() + b"\n")
        return
    table = [[heading for heading, _ in _COLUMNS]]
    table += [[str(row.get(key, "")) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    for r in table:
        # Names and the dead-letter queue left-aligned, counts right-aligned; no trailing blanks.
        cells = [
            c.rjust(w) if 0 < i < len(_COLUMNS) - 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.write(("  ".join(cells).rstrip() + "\n").encode())


def _stats(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    stats = client.stats(args.queue)
    if args.json:
        out.write(json.dumps(stats).encode() + b"\n")
        return
    for key, value in _flatten(stats):
        out.write(f"{key}: {'-' if value is None else value}\n".encode())


def _flatten(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _purge(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    out.write(b"%d\n" % client.purge(args.queue))


def _delete(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    client.delete_queue(args.queue)


def _redrive(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    out.write(b"%d\n" % client.redrive(args.queue, to=args.to, max=args.max))


def _utc(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(message: dict[str, Any]) -> dict[str, Any]:
    payload = message.get("payload")
    if isinstance(payload, bytes):
        return {**message, "payload": base64.b64encode(payload).decode(), "encoding": "base64"}
    return message


_EVENT_FIELDS = ("at", "kind", "attempt", "connection")


def _trace(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    message = client.history(args.queue, args.id)
    if args.json:
        out.write(json.dumps(_jsonable(message)).encode() + b"\n")
        return
    out.write(f"{message['queue']} {message['id']}: {message['state']}\n".encode())
    for event in message["events"]:
        extra = [f"{k}={v}" for k, v in event.items() if k not in _EVENT_FIELDS and v is not None]
        if event["attempt"]:
            extra.insert(0, f"attempt={event['attempt']}")
        if event["connection"]:
            extra.insert(0, f"connection={event['connection']}")
        out.write(f"{_utc(event['at'])}  {event['kind']:<14} {' '.join(extra)}".rstrip().encode() + b"\n")


def _history(client: replika.Client, args: argparse.Namespace, out: IO[bytes]) -> None:
    messages = client.history_list(
        args.queue, max=args.max, state=args.state, since=args.since, until=args.until, header=args.header
    )
    for m in messages:
        if args.json:
            out.write(json.dumps(_jsonable(m)).encode() + b"\n")
        else:
            kinds = ",".join(e["kind"] for e in m["events"])
            out.write(f"{m['id']}  {_utc(m['published_at'])}  {m['state']:<13}  {kinds}\n".encode())
