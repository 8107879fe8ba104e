"""The debug text protocol: what a person typing into ``nc localhost 8777`` speaks (SPEC.md §12).

A connection whose first byte is an ASCII letter is a text session (a binary frame's first byte is the top byte
of its length, which is never a letter for a frame the server would accept). Commands are lines, replies are lines:
``OK ...``, ``ERR CODE message``, ``PONG``, and for multi-line replies ``OK <n>`` followed by n entries. Every
command becomes the binary protocol's request and goes down the same path (validation, permissions, rate limits,
group commit, leases held by this connection), answered one at a time in order.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

from replika_protocol import ErrorCode, Frame, Op
from replika_server.auth import Principal
from replika_server.pipeline import Outcome, Pipeline
from replika_server.replies import reply_frame
from replika_server.requests import RequestError
from replika_server.store import StoreError

__all__ = ["TextConnection", "TextSession", "is_text_start"]

#: Longest line before AUTH (when authentication is configured): nothing long is needed to log in.
MAX_LINE_UNAUTHENTICATED = 4096
#: Lines answered per loop turn before the session lets other connections run.
LINES_PER_TURN = 128

HELP = [
    "HELP                            this text",
    "PING                            PONG",
    "AUTH token                      authenticate (when the broker runs with --auth)",
    "PUB queue text                  publish the rest of the line as one message: OK <id>",
    "FETCH queue [n] [wait] [lease]  lease up to n messages (default 1) for lease s (default 30), waiting up to",
    "                                wait s (default 0) for the first:",
    "                                OK <count>, then per message: MSG <id>:<token> attempts=<a> bytes=<b>",
    "                                and the payload on the next line",
    "ACK queue id:token [...]        delete processed messages (id:token as printed by FETCH)",
    "NACK queue id:token [delay]     make a message ready again, after delay seconds",
    "STATS [queue]                   one queue's counts, or the broker's",
    "QUEUES                          every queue with its counts: OK <n>, then a line per queue",
    "QUIT                            close the connection",
]


#: An HTTP/1.x request line ("GET / HTTP/1.1"): the first line of a client that has the wrong port.
_HTTP_REQUEST = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]")


def is_text_start(first: int) -> bool:
    """Whether a connection whose first byte is ``first`` speaks the text protocol."""
    return 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A


class TextConnection(Protocol):
    """What a text session needs of its connection (:class:`~replika_server.connection.Connection`)."""

    principal: Principal | None
    owner: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def closed(self) -> bool: ...

    def write_pressure(self) -> bool:
        """Whether replies are not being taken (answer no more lines until :meth:`TextSession.resume`)."""

    def send_text(self, data: bytes) -> None: ...
    def set_text_backlog(self, full: bool) -> None: ...
    def begin_request(self) -> None: ...
    def end_request(self) -> None: ...
    def text_authenticated(self) -> None: ...
    def close(self) -> None: ...


class TextSession:
    def __init__(self, conn: TextConnection, pipeline: Pipeline, info: Callable[[], dict[str, object]]) -> None:
        self._conn = conn
        self._pipeline = pipeline
        self._info = info
        self._buf = bytearray()
        self._lines: collections.deque[bytes] = collections.deque()
        self._busy = False
        self._closing = False
        self._first = True  # the first line may be an HTTP request: someone gave the broker's port for the admin's
        self._commands: dict[str, Callable[[list[str], bytes], None]] = {
            "HELP": self._help,
            "PING": self._ping,
            "AUTH": self._auth,
            "PUB": self._pub,
            "FETCH": self._fetch,
            "ACK": self._ack,
            "NACK": self._nack,
            "STATS": self._stats,
            "QUEUES": self._queues,
            "QUIT": self._quit,
        }

    # ----------------------------------------------------------------------------------------------- input
    @property
    def pending(self) -> bool:
        """Lines received and not yet answered."""
        return self._busy or bool(self._lines)

    @property
    def _max_line(self) -> int:
        if self._conn.principal is None:
            return MAX_LINE_UNAUTHENTICATED
        return self._pipeline.config.max_payload + 1024  # PUB carries a payload on its line

    def feed(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            start = end + 1
            self._lines.append(line[:-1] if line.endswith(b"\r") else line)
        del self._buf[:start]
        self._next()
        # After the complete lines ran (an AUTH among them raises the limit), the unfinished one must fit.
        if not self._closing and len(self._buf) > self._max_line:
            self._fatal(ErrorCode.FRAME_TOO_LARGE, f"line longer than {self._max_line} bytes")

    def _next(self) -> None:
        """Answer waiting lines in order: at most LINES_PER_TURN per loop turn, none while the replies are not
        being read (the connection resumes us), so that a client that floods lines and never reads cannot make
        us buffer more than about the high-water mark."""
        done = 0
        while self._lines and not self._busy and not self._closing:
            if self._conn.write_pressure():
                break  # resume_writing calls resume()
            if done >= LINES_PER_TURN:
                self._conn.loop.call_soon(self._next)
                break
            self._run(self._lines.popleft())
            done += 1
        # Reading pauses while lines wait: what is buffered stays within one read.
        self._conn.set_text_backlog(bool(self._lines))

    def resume(self) -> None:
        """The connection's replies drained: go on answering."""
        self._next()

    def _run(self, line: bytes) -> None:
        first, self._first = self._first, False
        if first and _HTTP_REQUEST.fullmatch(line):
            self._not_http()
            return
        if len(line) > self._max_line:
            self._fatal(ErrorCode.FRAME_TOO_LARGE, f"line longer than {self._max_line} bytes")
            return
        head, _, rest = line.partition(b" ")
        try:
            name = head.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        if not name:
            if line.strip():
                self._err(ErrorCode.UNKNOWN_OP, "commands are ASCII words; try HELP")
            return  # an empty line: nothing to answer
        command = self._commands.get(name)
        if command is None:
            self._err(ErrorCode.UNKNOWN_OP, f"unknown command {name!r}; try HELP")
            return
        if self._conn.principal is None and name not in ("HELP", "PING", "AUTH", "QUIT"):
            self._err(ErrorCode.UNAUTHORIZED, "this broker needs a token: AUTH <token> first")
            return
        args = rest.decode("utf-8", "replace").split()
        try:
            command(args, rest)
        except RequestError as exc:
            self._err(exc.code, exc.message, exc.extra)

    # ----------------------------------------------------------------------------------------------- output
    def _write(self, *lines: bytes | memoryview | str) -> None:
        # Joined once: a payload (bytes, or a view of a big one) is copied only into the result.
        parts = [part for x in lines for part in (x.encode() if isinstance(x, str) else x, b"\r\n")]
        self._conn.send_text(b"".join(parts))

    def _err(self, code: ErrorCode, message: str, extra: Frame | None = None) -> None:
        suffix = "".join(f" {k}={v}" for k, v in (extra or {}).items())
        self._write(f"ERR {code.value} {message}{suffix}")

    def _not_http(self) -> None:
        """Answer an HTTP request with one HTTP response that says where the HTTP is, then close: a browser or
        curl shows it instead of ``ERR`` lines (or "HTTP/0.9 when not allowed")."""
        body = (
            b"This is Replika's broker port: it speaks Replika's binary protocol (SPEC.md) and a text protocol "
            b"(try HELP), not HTTP.\nThe dashboard, admin API and metrics are on the admin port (8333 unless "
            b"replika serve was given --admin-port).\n"
        )
        head = (
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Replika-Error: {ErrorCode.UNKNOWN_OP.value}"
            "\r\n\r\n"
        )
        self._conn.send_text(head.encode() + body)
        self._closing = True
        self._lines.clear()
        self._conn.close()

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self.fatal(code, message)

    def fatal(self, code: ErrorCode, message: str) -> None:
        """Say why as a line, then close (timeouts and revocation come from the connection through here)."""
        self._err(code, message)
        self._closing = True
        self._lines.clear()
        self._conn.close()

    # ----------------------------------------------------------------------------------------------- requests
    def _request(self, op: str, frame: Frame, reply: Callable[[Frame], None]) -> None:
        """Send ``frame`` down the binary protocol's path; ``reply`` gets the binary reply's fields."""
        principal = self._conn.principal
        assert principal is not None
        admitted = self._pipeline.admit(principal, op, {"op": op, **frame}, self._conn.owner)
        self._busy = True
        self._conn.begin_request()
        store_op = admitted.op

        def done(result: Outcome) -> None:
            self._done(result if isinstance(result, StoreError) else reply_frame(store_op, result), reply)

        admitted.run(done)

    def _done(self, result: Frame | StoreError, reply: Callable[[Frame], None]) -> None:
        self._busy = False
        self._conn.end_request()
        if self._conn.closed:
            return
        if isinstance(result, StoreError):
            self._err(ErrorCode(result.code), result.message)
        else:
            reply(result)
        self._next()

    # ----------------------------------------------------------------------------------------------- commands
    def _help(self, args: list[str], rest: bytes) -> None:
        self._write(f"OK {len(HELP)}", *HELP)

    def _ping(self, args: list[str], rest: bytes) -> None:
        self._write("PONG")

    def _quit(self, args: list[str], rest: bytes) -> None:
        self._write("OK bye")
        self._closing = True
        self._conn.close()

    def _auth(self, args: list[str], rest: bytes) -> None:
        if len(args) != 1:
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: AUTH <token>")
        principal = self._pipeline.authenticate(args[0])
        if principal is None:
            self._fatal(ErrorCode.UNAUTHORIZED, "unknown token")
            return
        self._conn.principal = principal
        self._conn.text_authenticated()
        self._write(f"OK authenticated as {principal.name}")

    def _pub(self, args: list[str], rest: bytes) -> None:
        queue, space, payload = rest.partition(b" ")
        if not queue or not space:
            # "PUB q" is far more likely a forgotten text than a wanted empty message: that one is "PUB q ".
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: PUB <queue> <text> (an empty message: 'PUB <queue> ')")
        self._request(
            Op.PUBLISH,
            {"queue": queue.decode("utf-8", "replace"), "payloads": [payload]},
            lambda r: self._write(f"OK {r['first_id']}"),
        )

    def _fetch(self, args: list[str], rest: bytes) -> None:
        if not 1 <= len(args) <= 4:
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: FETCH <queue> [n] [wait] [lease]")
        frame: Frame = {"queue": args[0]}
        if len(args) > 1:
            frame["max"] = _int(args[1], "n")
        if len(args) > 2:
            frame["wait"] = _float(args[2], "wait")
        if len(args) > 3:
            frame["lease"] = _float(args[3], "lease")  # else the binary fetch's default, 30 s

        def reply(r: Frame) -> None:
            lines: list[bytes | str] = [f"OK {len(r['msgs'])}"]
            for mid, token, attempts, _published_at, payload, _headers in r["msgs"]:
                lines.append(f"MSG {mid}:{token} attempts={attempts} bytes={len(payload)}")
                lines.append(payload)
            self._write(*lines)

        self._request(Op.FETCH, frame, reply)

    def _settle(self, op: str, queue: str, handles: list[str], **extra: Any) -> None:
        ids, tokens = [], []
        for handle in handles:
            mid, sep, token = handle.partition(":")
            if not sep or not mid.isdigit() or not token.isdigit():
                raise RequestError(ErrorCode.BAD_REQUEST, f"{handle!r} is not a lease id:token as FETCH prints")
            ids.append(int(mid))
            tokens.append(int(token))

        def reply(r: Frame) -> None:
            reasons = r.get("reasons") or {}
            if not reasons:
                self._write("OK")
            else:
                stale = ", ".join(
                    f"{mid}:{t} {_STALE_WHY[reasons[mid]]}"
                    for mid, t in zip(ids, tokens, strict=True)
                    if mid in reasons
                )
                self._write(f"ERR STALE_LEASE not current: {stale}")

        self._request(op, {"queue": queue, "ids": ids, "tokens": tokens, **extra}, reply)

    def _ack(self, args: list[str], rest: bytes) -> None:
        if len(args) < 2:
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: ACK <queue> <id:token> [<id:token> ...]")
        self._settle("ack", args[0], args[1:])

    def _nack(self, args: list[str], rest: bytes) -> None:
        if len(args) not in (2, 3):
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: NACK <queue> <id:token> [delay]")
        delay = _float(args[2], "delay") if len(args) == 3 else 0.0
        self._settle("nack", args[0], args[1:2], delay=delay)

    def _stats(self, args: list[str], rest: bytes) -> None:
        if len(args) > 1:
            raise RequestError(ErrorCode.BAD_REQUEST, "usage: STATS [queue]")
        if args:
            self._request(Op.STATS, {"queue": args[0]}, lambda r: self._write("OK " + _fields(r["stats"])))
            return
        self._write("OK " + " ".join(f"{k}={v}" for k, v in self._info().items()))

    def _queues(self, args: list[str], rest: bytes) -> None:
        def reply(r: Frame) -> None:
            self._write(f"OK {len(r['queues'])}", *(_fields(s) for s in r["queues"]))

        self._request(Op.QUEUES, {}, reply)


#: What a settle's refusal reason (SPEC.md §5, settle ops) means, for a person at a terminal.
_STALE_WHY = {
    "gone": "is no longer in the queue (already acked, or moved)",
    "redelivered": "was delivered again since",
    "settled": "was already settled by a NACK",
    "unknown": "was never issued for this message",
}


def _fields(stats: dict[str, Any]) -> str:
    keys = ("queue", "ready", "in_flight", "delayed", "total", "bytes", "dead_letter", "max_attempts")
    return " ".join(f"{k}={'-' if stats.get(k) is None else stats.get(k)}" for k in keys if k in stats)


def _int(text: str, name: str) -> int:
    if not text.isdigit():
        raise RequestError(ErrorCode.BAD_REQUEST, f"{name} must be a whole number, not {text!r}")
    return int(text)


def _float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{name} must be a number of seconds, not {text!r}")
    return value
