"""The TCP server: bytes from sockets into broker calls, results back into bytes. Glue, nothing more.

Each :class:`Connection` parses every complete frame of a ``data_received`` at once, hands the requests to the
broker (which batches them across connections into one commit), and coalesces its replies into one write per
loop turn. A connection that does not read its replies, or pipelines without bound, is paused rather than
buffered without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import structlog

from replika_protocol import (
    SUPPORTED_VERSIONS,
    ErrorCode,
    Frame,
    FrameDecoder,
    ProtocolError,
    encode_body,
    encode_frame_parts,
    frame_header,
)
from replika_server import __version__
from replika_server.auth import AuthTable, Principal, anonymous, default_limit, load_auth
from replika_server.broker import Broker
from replika_server.config import Config, ConfigError, check_exposure
from replika_server.metrics import LATENCY_BUCKETS, Histogram
from replika_server.requests import Limits, RequestError, fetch_op, parse_op
from replika_server.store import Fetch, LmdbConfig, LmdbStore, QueueStats, StoreError
from replika_server.text import TextSession, is_text_start

__all__ = ["Connection", "Reply", "Server", "run_server"]

log = structlog.get_logger("replika.server")

#: Requests one connection may have waiting on the broker before we stop reading from it (pipelining bound).
MAX_INFLIGHT_REQUESTS = 10_000
#: Largest frame accepted before the handshake: a hello is small, and an unauthenticated peer must not make
#: us buffer megabytes on its behalf.
HANDSHAKE_MAX_FRAME = 64 * 1024
#: Bytes of unsent replies above which a connection stops being read (asyncio's high-water mark).
WRITE_HIGH_WATER = 64 * 1024
#: Frames decoded and answered per connection per loop turn; the rest wait, undecoded, for the next turn.
FRAMES_PER_TURN = 128
#: Seconds a closed connection may take to send its last replies before it is cut off (a peer that never reads).
CLOSE_GRACE = 5.0
#: Seconds a connection refused at max_connections has to read why before it is cut off.
REFUSE_GRACE = 1.0
#: Seconds a graceful shutdown waits for replies to drain before closing connections anyway.
SHUTDOWN_GRACE = 5.0
#: Net container allocations between collections of the youngest generation in ``replika serve`` (Python's
#: default is 700). The broker allocates a record per delivered message and frees it at the ack, a round trip
#: later; at 700 the collector ran every few hundred deliveries and walked the leased records each time, about
#: 7% of the broker's time fetching a backlog. Nothing on the hot paths makes reference cycles.
GC_YOUNG_THRESHOLD = 10_000

#: Gets a request's reply map (without ``id`` and ``ok``), or the StoreError it failed with.
Reply = Callable[[Frame | StoreError], None]

_owner_ids = itertools.count(1)
#: Replies below this size are joined into one buffer per write; larger ones are written without a copy.
_COPY_LIMIT = 256 * 1024
#: Fetch replies of at most this many messages are checked for big payloads to pass through uncopied.
_FEW = 64


class Connection(asyncio.Protocol):
    """One client connection: handshake, then pipelined requests answered by correlation id."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._broker = server.broker
        self._limits = server.limits
        self._decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME, server.config.max_frame))
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._last_active = self._loop.time()
        self.principal: Principal | None = None  # who the handshake authenticated
        self._registered = False  # counted in server.connections (not refused at the door)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_large = False  # _out holds a large reply: write it without joining
        self._out_size = 0  # bytes in _out
        self._text: TextSession | None = None  # set when the connection turned out to speak the text protocol
        self._first_data = True
        self._parked: list[Frame] = []  # decoded, held back until the replies drain (at most FRAMES_PER_TURN)
        self._more = False  # the decoder may hold more complete frames, to be decoded on a later turn
        self._flush_scheduled = False
        self._ready = False  # handshake done
        self._closed = False
        self._inflight = 0
        self._paused_by_inflight = False
        self._paused_by_writes = False
        self._eof = False  # the client half-closed; close once in-flight requests are answered
        self._broken: ProtocolError | None = None  # the stream broke; close once in-flight requests are answered
        self.owner = next(_owner_ids)
        self.peer: Any = None
        self.lost: asyncio.Future[None] = self._loop.create_future()

    # ----------------------------------------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # half-open peers get noticed
        config = self._server.config
        if len(self._server.connections) >= config.max_connections:
            self._server.refuse_connection()
            message = f"the broker is at its limit of {config.max_connections} connections; try again later"
            self._error(None, ErrorCode.TOO_MANY_CONNECTIONS, message)
            self._flush()
            self._closed = True  # what it sends is dropped unread
            # Half-close rather than close: closing with its hello unread would reset the connection, and the
            # reset can overtake our error frame. It closes once it has read why; if it does not, we cut it off.
            if self._transport.can_write_eof():
                self._transport.write_eof()
            else:
                self._transport.close()
            self._loop.call_later(REFUSE_GRACE, self._transport.abort)
            return
        self._registered = True
        self._server.accepted += 1
        self._server.connections.add(self)
        self._server.by_owner[self.owner] = self
        self._transport.set_write_buffer_limits(high=min(WRITE_HIGH_WATER, config.max_outbound // 2))
        self._timer = self._loop.call_later(config.handshake_timeout, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._registered:
            self._registered = False
            self._server.connections.discard(self)
            del self._server.by_owner[self.owner]
            self._broker.release(self.owner)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # refused or closing: nothing more is read
        self._last_active = self._loop.time()
        if self._text is not None:
            self._text.feed(data)
            return
        if self._first_data and data:
            self._first_data = False
            if self._server.config.text_protocol and is_text_start(data[0]):
                self._start_text(data)
                return
        self._consume(data)

    # ----------------------------------------------------------------------------------------------- text mode
    def _start_text(self, data: bytes) -> None:
        """A person (or a script) typing lines: hand the connection to a text session (replika_server.text)."""
        self._text = TextSession(self, self._server)
        if self._server.auth is None:
            self.principal = self._server.authenticate(None)
            self.text_authenticated()
        # With --auth the handshake deadline stays: AUTH within --handshake-timeout, as a binary hello.
        self._text.feed(data)

    def text_authenticated(self) -> None:
        """The text session is logged in: from now on only idleness counts, as after a binary hello."""
        self._ready = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server.config.idle_timeout > 0:
            self._timer = self._loop.call_later(self._server.config.idle_timeout, self._on_timer)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def write_pressure(self) -> bool:
        """Replies are not being taken: the socket is full, or this turn's replies passed the high-water mark."""
        if self._out_size >= WRITE_HIGH_WATER:
            self._flush()
        return self._paused_by_writes

    @property
    def closed(self) -> bool:
        return self._closed

    def send_text(self, data: bytes) -> None:
        if self._closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        self._schedule_flush()

    def set_text_backlog(self, full: bool) -> None:
        """A text session has lines waiting: stop reading until it catches up."""
        if full != self._more:
            self._more = full  # the same switch as undecoded binary frames: reading pauses while it is set
            self._update_reading()
        if not full:
            self._maybe_finish()

    def begin_request(self) -> None:
        self._begin()

    def end_request(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._last_active = self._loop.time()

    def _consume(self, data: bytes) -> None:
        """Decode and answer up to FRAMES_PER_TURN frames. The rest stay undecoded in the decoder and reading
        pauses until the next loop turn, so that one client's burst of requests does not hold up the others."""
        error: ProtocolError | None = None
        try:
            if self._ready:
                frames = self._decoder.feed(data, max_frames=FRAMES_PER_TURN)
            else:
                frames = self._feed_before_handshake(data)
        except ProtocolError as exc:
            frames, error = exc.frames, exc
        self._more = error is None and len(frames) >= FRAMES_PER_TURN
        self._run(frames)
        if self._closed:
            return
        if error is not None:
            # Answer the requests that came before the corruption, then say why and close.
            self._broken = error
        elif self._more and not self._parked:
            self._loop.call_soon(self._consume_more)
        self._update_reading()
        self._maybe_finish()

    def _consume_more(self) -> None:
        if self._text is not None:
            return  # the text session reads its own lines; _more is its backlog switch
        if self._more and not self._parked and not self._closed and not self._paused_by_writes:
            self._consume(b"")

    def _feed_before_handshake(self, data: bytes) -> list[Frame]:
        """Frames one at a time until the hello succeeds: before it the frame limit is small, after it the
        configured one, and frames sent right behind the hello must get the latter."""
        frames = self._decoder.feed(data, max_frames=1)
        while frames and not self._ready:
            self._dispatch(frames[0])
            if self._closed:
                return []
            frames = self._decoder.feed(b"", max_frames=FRAMES_PER_TURN if self._ready else 1)
        return frames

    def _run(self, frames: list[Frame]) -> None:
        """Dispatch ``frames`` in order. Once a turn's replies pass the high-water mark and the socket will not
        take them, the rest wait in ``_parked`` (reading paused) until it drains: what a client that does not
        read can make us buffer stays bounded, however many small requests it sent."""
        for i, frame in enumerate(frames):
            if self.write_pressure():
                self._parked.extend(frames[i:])
                return
            self._dispatch(frame)
            if self._closed:
                return

    def _maybe_finish(self) -> None:
        """Once everything received is answered: close a broken or half-closed connection."""
        if self._inflight or self._parked or self._more or self._closed:
            return
        if self._text is not None and self._text.pending:
            return
        if self._broken is not None:
            self._fatal(self._broken.code, str(self._broken))
        elif self._eof:
            self.close()

    def close(self) -> None:
        """Send what is buffered, then close; a peer that will not read it is cut off after CLOSE_GRACE."""
        self._flush()
        self._closed = True  # nothing more may be written to a closing transport
        self._parked.clear()  # nor may anything held back run
        if self._transport is not None:
            self._transport.close()
            if self._transport.get_write_buffer_size():
                self._loop.call_later(CLOSE_GRACE, self._transport.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close (True keeps the transport open meanwhile)."""
        if self._closed:
            return False  # refused or closing: let the transport close
        self._eof = True
        self._maybe_finish()
        return True

    def pause_writing(self) -> None:
        self._paused_by_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_by_writes = False
        if self._closed:
            return  # a closing transport drains: nothing held back may run any more
        if self._text is not None:
            self._text.resume()
        if self._parked:
            parked = list(self._parked)
            self._parked.clear()
            self._run(parked)
            if self._closed:
                return
            self._maybe_finish()
        if self._more and not self._parked:
            self._loop.call_soon(self._consume_more)
        self._update_reading()
        self._broker.resume(self.owner)  # fetches held back for lack of outbound room may go now

    def reply_room(self) -> int:
        """Bytes of replies this connection may still be sent before it must read some (``max_outbound``)."""
        if self._transport is None or self._closed:
            return 0
        return self._server.config.max_outbound - self._transport.get_write_buffer_size()

    def _on_timer(self) -> None:
        """The handshake deadline, then the idle check: a connection that sent nothing and waits for nothing
        for ``idle_timeout`` seconds is closed (clients keep theirs alive with ``ping``)."""
        self._timer = None
        if self._closed:
            return
        config = self._server.config
        if not self._ready:
            self._fatal(ErrorCode.HANDSHAKE_TIMEOUT, f"no handshake within {config.handshake_timeout:g} seconds")
            return
        if config.idle_timeout <= 0:
            return
        now = self._loop.time()
        if self._inflight:
            self._last_active = now  # waiting on us (a long poll) is not idleness
        due = self._last_active + config.idle_timeout
        if now >= due:
            self._fatal(
                ErrorCode.IDLE_TIMEOUT,
                f"nothing received for {config.idle_timeout:g} seconds; send ping to keep a connection open",
            )
            return
        self._timer = self._loop.call_at(due, self._on_timer)

    def revoke(self, message: str) -> None:
        """The token this connection authenticated with was removed or changed (an auth reload)."""
        self._fatal(ErrorCode.UNAUTHORIZED, message)

    # ----------------------------------------------------------------------------------------------- replies
    def _send(self, obj: Frame) -> None:
        if self._closed:
            return
        body = encode_body(obj)
        self._out_size += len(body)
        if len(body) < _COPY_LIMIT:
            self._out.append(frame_header(len(body)) + body)
        else:
            # A large reply is handed over as is, header and body apart: joining would copy megabytes only to
            # have the transport copy them again.
            self._out.append(frame_header(len(body)))
            self._out.append(body)
            self._out_large = True
        self._schedule_flush()

    def _send_deliveries(self, reply: Frame) -> None:
        """A fetch reply: when it carries big payloads (the store hands those out as views of what it read),
        they go to the transport uncopied, each its own buffer of one ``writelines``."""
        msgs = reply["msgs"]
        # A reply of many messages is one of small ones (they share the frame limit): not worth the look.
        if self._closed or len(msgs) > _FEW or not any(type(m[4]) is memoryview for m in msgs):
            self._send(reply)
            return
        parts = encode_frame_parts(reply)
        self._out.extend(parts)
        self._out_size += sum(map(len, parts))  # bytes: the store's views are of bytes
        self._out_large = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._broker.dispatching:
                self._server.dirty.append(self)  # written as soon as the whole batch is handed out
            else:
                # One write per loop turn, however many replies this turn produced.
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._out_size = 0
        if self._out and not self._closed and self._transport is not None:
            out, self._out = self._out, []
            if self._out_large:
                self._out_large = False
                self._transport.writelines(out)
            else:
                self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _error(self, rid: int | None, code: ErrorCode, message: str, extra: Frame | None = None) -> None:
        reply: Frame = {"id": rid, "ok": False, "code": code.value, "message": message}
        if extra:
            reply.update(extra)
        self._send(reply)

    def _fatal(self, code: ErrorCode, message: str, rid: int | None = None) -> None:
        """The byte stream is unusable: say why, then close."""
        log.info("connection_protocol_error", peer=self.peer, code=code.value, message=message)
        if self._text is not None:
            self._text.fatal(code, message)  # a text session is told in a line, as everything else
            return
        self._error(rid, code, message)
        self.close()

    def _update_reading(self) -> None:
        if self._transport is None or self._closed:
            return
        if self._paused_by_writes or self._paused_by_inflight or self._broken is not None or self._parked or self._more:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    # ----------------------------------------------------------------------------------------------- requests
    def _dispatch(self, frame: Frame) -> None:
        rid = frame.get("id")
        if type(rid) is not int or not 0 <= rid < 2**64:
            if not self._ready:  # before the handshake nothing is answered twice: one bad frame ends it
                self._fatal(ErrorCode.BAD_REQUEST, "the first request must be 'hello' with an unsigned integer 'id'")
                return
            self._error(None, ErrorCode.BAD_REQUEST, "every request needs an 'id': an unsigned integer")
            return
        op = frame.get("op")
        if not self._ready:
            self._handshake(rid, frame)
            return
        if not isinstance(op, str):
            self._error(rid, ErrorCode.BAD_REQUEST, "every request needs an 'op': a string")
            return
        try:
            if op == "ping":
                self._send({"id": rid, "ok": True})
            elif op == "hello":
                raise RequestError(ErrorCode.BAD_REQUEST, "the handshake was already done")
            else:
                assert self.principal is not None
                run = self._server.admit(self.principal, op, frame, self.owner)
                self._begin()
                run(functools.partial(self._done, rid))
        except RequestError as exc:
            self._error(rid, exc.code, exc.message, exc.extra)

    def _handshake(self, rid: int, frame: Frame) -> None:
        if frame.get("op") != "hello":
            self._fatal(ErrorCode.BAD_REQUEST, "the first request must be 'hello'", rid)
            return
        versions = frame.get("versions")
        if not isinstance(versions, list) or not all(type(v) is int for v in versions):
            self._fatal(ErrorCode.BAD_REQUEST, "hello needs 'versions': an array of integers", rid)
            return
        common = set(versions) & set(SUPPORTED_VERSIONS)
        if not common:
            self._fatal(
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version: client speaks {versions}, server {list(SUPPORTED_VERSIONS)}",
                rid,
            )
            return
        principal = self._server.authenticate(frame.get("token"))
        if principal is None:
            message = "a token is required" if frame.get("token") is None else "unknown token"
            log.info("unauthorized", peer=self.peer, reason=message)
            self._fatal(ErrorCode.UNAUTHORIZED, message, rid)
            return
        self.principal = principal
        self._ready = True
        config = self._server.config
        self._decoder.max_frame = config.max_frame
        if self._timer is not None:  # the handshake deadline becomes the idle check
            self._timer.cancel()
            self._timer = None
        if config.idle_timeout > 0:
            self._timer = self._loop.call_later(config.idle_timeout, self._on_timer)
        self._send(
            {
                "id": rid,
                "ok": True,
                "version": max(common),
                "server": f"replika {__version__}",
                "max_frame": config.max_frame,
                "max_batch": config.max_batch,
                "max_payload": config.max_payload,
                "idle_timeout": config.idle_timeout,
                "features": [],
            }
        )

    def _begin(self) -> None:
        self._inflight += 1
        if self._inflight >= MAX_INFLIGHT_REQUESTS and not self._paused_by_inflight:
            self._paused_by_inflight = True
            self._update_reading()

    def _done(self, rid: int, result: Frame | StoreError) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._last_active = self._loop.time()
        if self._paused_by_inflight and self._inflight <= MAX_INFLIGHT_REQUESTS // 2:
            self._paused_by_inflight = False
            self._update_reading()
        if isinstance(result, StoreError):
            self._error(rid, result.code, result.message)
        else:
            result["id"] = rid
            result["ok"] = True
            if "msgs" in result:
                self._send_deliveries(result)
            else:
                self._send(result)
        if self._inflight == 0:
            self._maybe_finish()


def _forbidden(principal: Principal, verb: str, queue: str) -> RequestError:
    where = f" queue {queue!r}" if queue else ""
    return RequestError(ErrorCode.FORBIDDEN, f"token {principal.name!r} may not {verb}{where}")


#: Ops that need the ``admin`` permission, and what the refusal says they do.
_ADMIN_OPS = {
    "declare": "declare",
    "delete_queue": "delete",
    "purge": "purge",
    "redrive": "redrive",
    "bind": "bind",
    "unbind": "unbind",
}
_CONSUME_OPS = frozenset({"ack", "nack", "reject", "touch"})


def _authorize(principal: Principal, op: str, store_op: Any, fmt: Any) -> Any:
    """Raise FORBIDDEN unless ``principal`` may run ``op``; the reply formatter to use (a listing is filtered
    down to what the principal may see)."""
    queue: str = getattr(store_op, "queue", None) or ""
    if op == "publish":
        allowed = principal.may_publish(queue)
        verb = "publish to"
    elif op == "publish_topic":
        # Which queues the topic reaches is known only in the store: it checks each against this, all or none.
        store_op.may_publish = principal.may_publish
        return fmt
    elif op in _CONSUME_OPS:
        allowed = principal.may_consume(queue)
        verb = f"{op} messages of"
    elif op in _ADMIN_OPS:
        allowed = principal.admin
        verb = _ADMIN_OPS[op]
    elif op == "peek":
        allowed = principal.admin or principal.may_consume(queue)
        verb = "peek at"
    elif op == "stats":
        allowed = principal.may_see(queue)
        verb = "see the stats of"
    elif op == "queues":
        if principal.admin:
            return fmt
        return lambda result: {"queues": [s.as_dict() for s in result if principal.may_see(s.name)]}
    else:  # a new op must be given a rule here before anyone but an all-powerful token may use it
        allowed, verb = False, op
    if not allowed:
        raise _forbidden(principal, verb, queue)
    return fmt


def _stats_reply(result: list[QueueStats]) -> Frame:
    return {"stats": result[0].as_dict()}


def _queues_reply(result: list[QueueStats]) -> Frame:
    return {"queues": [s.as_dict() for s in result]}


def _publish_reply(result: tuple[int, ...]) -> Frame:
    reply: Frame = {"first_id": result[0], "count": result[1]}
    if len(result) > 2:  # the request had dedup_ids: one id per payload, an earlier message's for a repeat
        reply["ids"] = result[2]
    return reply


def _settle_reply(result: dict[int, str]) -> Frame:
    return {"failed": result}


def _empty_reply(result: Any) -> Frame:
    return {}


_REPLIES: dict[str, Any] = {
    "publish": _publish_reply,
    "ack": _settle_reply,
    "nack": _settle_reply,
    "reject": _settle_reply,
    "touch": _settle_reply,
    "declare": _empty_reply,
    "delete_queue": _empty_reply,
    "purge": lambda n: {"purged": n},
    "peek": lambda msgs: {"msgs": msgs},
    "redrive": lambda n: {"moved": n},
    "publish_topic": lambda ids: {"ids": ids},
    "bind": _empty_reply,
    "unbind": _empty_reply,
    "stats": _stats_reply,
    "queues": _queues_reply,
}


class Server:
    """The listening broker: store, broker and TCP listener, started and stopped together."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.limits = Limits(config.max_batch, config.max_payload, config.max_frame - 1024)
        self._loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.by_owner: dict[int, Connection] = {}
        self.dirty: list[Connection] = []  # connections with replies from the batch being handed out
        self.refused = 0  # connections refused at max_connections
        self.accepted = 0  # connections accepted (past the limit check)
        self.started_at = time.time()
        self.publish_confirm = Histogram(LATENCY_BUCKETS)  # publish request received -> its commit confirmed
        self.admin: Any = None  # the HTTP sidecar, when configured (replika_server.admin.AdminServer)
        self._admin_start: asyncio.Task[None] | None = None  # its web stack loading, in the background
        self._refusal_logged = -1e9
        broker.after_dispatch = self._flush_dirty
        broker.limit_replies(self._reply_room, self.limits.max_reply_bytes)
        self._listener: asyncio.Server | None = None
        self.auth: AuthTable | None = None
        self._anonymous = anonymous(default_limit(config.publish_rate, config.publish_burst))
        if config.auth is not None:
            self.auth = load_auth(config.auth, default_limit(config.publish_rate, config.publish_burst))

    def admit(self, principal: Principal, op: str, frame: Frame, owner: int) -> Callable[[Reply], None]:
        """Validate, authorize and rate-limit request ``frame`` (any op but hello and ping), or raise
        :class:`RequestError`. Returns the function that runs it: it hands the broker the op, and its argument
        gets the reply map (without ``id`` and ``ok``) or the :class:`StoreError`. The one path of the binary
        protocol, the text protocol and the HTTP APIs, so that none can do what another could not."""
        if op == "fetch":
            fetch, wait = self._prepare_fetch(principal, frame, owner)
            return functools.partial(self._run_fetch, fetch, wait)
        store_op, fmt = self._prepare(principal, op, frame, owner)
        # perf_counter: uvloop's loop.time() has millisecond steps, too coarse for sub-millisecond confirms.
        return functools.partial(self._run, store_op, fmt, time.perf_counter() if op == "publish" else None)

    def _run_fetch(self, fetch: Fetch, wait: float, reply: Reply) -> None:
        self.broker.fetch(fetch, wait, lambda r: reply(r if isinstance(r, StoreError) else {"msgs": r}))

    def _run(self, store_op: Any, fmt: Any, published: float | None, reply: Reply) -> None:
        def done(result: Any) -> None:
            if published is not None:
                self.publish_confirm.observe(time.perf_counter() - published)
            reply(result if isinstance(result, StoreError) else fmt(result))

        self.broker.submit(store_op, done)

    def _prepare(self, principal: Principal, op: str, frame: Frame, owner: int) -> tuple[Any, Any]:
        """The store op for request ``frame`` and the formatter of its reply, once validated, authorized and
        admitted by the rate limit; or :class:`RequestError`."""
        store_op = parse_op(op, frame, owner, self.limits)
        fmt = _REPLIES[op]
        if not principal.everything:
            fmt = _authorize(principal, op, store_op, fmt)
        if principal.bucket is not None and op in ("publish", "publish_topic"):
            # A topic publish counts its messages once, however many queues the topic reaches.
            wait = principal.bucket.take(len(store_op.payloads))
            if wait:
                raise RequestError(
                    ErrorCode.RATE_LIMITED,
                    f"token {principal.name!r} is over its publish rate; retry in {wait:.3f} s",
                    {"retry_after": round(wait, 3)},
                )
        return store_op, fmt

    def _prepare_fetch(self, principal: Principal, frame: Frame, owner: int) -> tuple[Fetch, float]:
        """The fetch op and its long-poll wait for request ``frame``, or :class:`RequestError`."""
        fetch, wait = fetch_op(frame, owner, self.limits)
        if not principal.may_consume(fetch.queue):
            raise _forbidden(principal, "consume from", fetch.queue)
        return fetch, wait

    def authenticate(self, token: object) -> Principal | None:
        """Who ``token`` (from a hello) is; without ``--auth`` everybody is the anonymous principal."""
        if self.auth is None:
            return self._anonymous
        return self.auth.authenticate(token)

    def reload_auth(self) -> bool:
        """Re-read the ``--auth`` file (SIGHUP). Connections keep going under their token's new permissions;
        those whose token was removed or given a new secret are closed with UNAUTHORIZED. A file that does not
        load leaves everything as it was. True if the new file is in force."""
        config = self.config
        if config.auth is None:
            return False
        try:
            table = load_auth(config.auth, default_limit(config.publish_rate, config.publish_burst), self.auth)
        except ConfigError as exc:
            log.error("auth_reload_failed", error=str(exc))
            return False
        self.auth = table
        revoked = 0
        for conn in list(self.connections):
            if conn.principal is None:
                continue
            successor = table.successor(conn.principal)
            if successor is None:
                revoked += 1
                conn.revoke(f"token {conn.principal.name!r} was revoked")
            else:
                conn.principal = successor
        log.info("auth_reloaded", tokens=len(table.principals), revoked_connections=revoked)
        return True

    def refuse_connection(self) -> None:
        """Count a connection refused at ``max_connections``; log the first of each burst, not every one."""
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= 10.0:
            self._refusal_logged = now
            log.warning("connections_refused", limit=self.config.max_connections, refused_total=self.refused)

    def _reply_room(self, owner: int) -> int:
        conn = self.by_owner.get(owner)
        # No connection: an HTTP fetch (its reply is bounded by the frame limit alone), or a closed
        # connection's, whose leases its Release ends anyway.
        return conn.reply_room() if conn is not None else self.limits.max_reply_bytes

    @classmethod
    async def start(cls, config: Config, *, admin_in_background: bool = False) -> Server:
        """Open the store and listen. Raises :class:`ConfigError` for settings that cannot be served (an
        unreadable auth file or certificate, an exposed bind without authentication).

        The admin sidecar's port is bound before this returns. With ``admin_in_background`` its web stack is
        loaded and served after, while the broker already serves (``replika serve``: a restart is not held up
        by importing FastAPI); otherwise it answers HTTP when this returns."""
        check_exposure(config)
        tls = _tls_context(config)
        _raise_fd_limit(config.max_connections)
        store = await LmdbStore.open(
            LmdbConfig(
                path=config.data_dir,
                durable=config.durability == "sync",
                max_size=config.max_store_size,
                map_size=min(256 * 1024 * 1024, config.max_store_size),
                sync_interval=config.sync_interval,
                max_queues=config.max_queues,
                default_max_length=config.queue_max_length or None,
                default_max_bytes=config.queue_max_bytes or None,
            )
        )
        server: Server | None = None
        try:
            server = cls(config, Broker(store))
            loop = asyncio.get_running_loop()
            server._listener = await loop.create_server(
                lambda: Connection(server),
                config.host,
                config.port,
                reuse_address=True,
                backlog=1024,
                ssl=tls,
                ssl_handshake_timeout=config.handshake_timeout if tls is not None else None,
            )
            if config.admin_port is not None:
                from replika_server.admin import AdminServer  # cheap: the web stack loads in serve()

                server.admin = AdminServer.bind(config)
                if admin_in_background:
                    server._admin_start = loop.create_task(server._serve_admin(server.admin))
                else:
                    await server.admin.serve(server)
        except BaseException:
            if server is not None and server._listener is not None:
                server._listener.close()
            if server is not None and server.admin is not None:
                await server.admin.stop()
            await store.close()
            raise
        log.info(
            "listening",
            host=config.host,
            port=server.port,
            durability=config.durability,
            tls=tls is not None,
            mutual_tls=config.tls_client_ca is not None,
            auth=str(config.auth) if config.auth is not None else None,
        )
        return server

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            try:
                conn._flush()
            except Exception:  # a transport failing must not keep the other connections' replies back
                conn._flush_scheduled = False
                log.exception("reply_write_failed", peer=conn.peer)

    @property
    def version(self) -> str:
        return str(__version__)

    @property
    def admin_port(self) -> int | None:
        """The admin sidecar's bound port, None without one."""
        return self.admin.port if self.admin is not None else None

    def store_bytes(self) -> int:
        """Size of the store's data file."""
        try:
            return (self.config.data_dir / "data.mdb").stat().st_size
        except OSError:
            return 0

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def _serve_admin(self, admin: Any) -> None:
        try:
            await admin.serve(self, import_in_thread=True)
            gc.freeze()  # the web stack's modules, as the broker's at start
        except Exception:
            # The broker keeps serving queues; the sidecar's port is closed, so its clients are refused.
            log.exception("admin_failed")
            await admin.stop()
            self.admin = None

    async def stop(self) -> None:
        """Stop accepting, finish the commit in progress, answer what is queued, close connections."""
        if self._admin_start is not None and not self._admin_start.done():
            self._admin_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._admin_start
        if self.admin is not None:
            await self.admin.stop()
        if self._listener is not None:
            self._listener.close()
        await self.broker.close()
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        if conns:
            # Transports close once their write buffers drain; a client that stopped reading gets aborted.
            await asyncio.wait([c.lost for c in conns], timeout=SHUTDOWN_GRACE)
        for conn in list(self.connections):
            conn.abort()
        log.info("stopped")


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            ctx.load_verify_locations(config.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate, key or client CA: {exc}") from None
    return ctx


def _raise_fd_limit(max_connections: int) -> None:
    """Make room for ``max_connections`` sockets (plus the store's and the process's own files)."""
    want = max_connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want or soft == resource.RLIM_INFINITY:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < want:
        log.warning("file_limit_low", max_connections=max_connections, open_files_limit=new)


async def run_server(config: Config, on_ready: Callable[[Server], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. ``on_ready`` runs once listening. If the store
    fails meanwhile, shut down the same way, then raise its ``STORE_FAILED`` :class:`StoreError`."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    server = await Server.start(config, admin_in_background=True)
    gc.freeze()  # what start-up made lives as long as the process: no collection needs to walk it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_auth)
    # Only now tell whoever waits for us (a port file): a SIGTERM sent as soon as it appears must stop us cleanly.
    if on_ready is not None:
        on_ready(server)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.broker.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    log.info("shutting_down", reason="signal" if stop.is_set() else "store_failed")
    await server.stop()
    failure = server.broker.failure  # read after the drain, which may be where the store failed
    if failure is not None:
        # Answered what was in flight; now exit non-zero, so that a supervisor restarts the broker and LMDB
        # reopens at its last durable commit.
        raise failure
