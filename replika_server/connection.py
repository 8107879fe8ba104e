"""One client connection: bytes in, frames out, flow control. Requests go to the pipeline; nothing else here.

A connection is in one :class:`State` at a time, moved only through :meth:`Connection._to`, which checks the
transition against :data:`TRANSITIONS`. Why reading is paused is a separate, small set of reasons
(:class:`FlowControl`), and replies are gathered into one write per loop turn by an :class:`Outbox`.

Each ``data_received`` decodes and answers up to FRAMES_PER_TURN frames; the requests go to the broker (through
the pipeline), which batches them across connections into one commit. A connection that does not read its
replies, or pipelines without bound, is paused rather than buffered without limit.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
from typing import Protocol, cast

import structlog

from replika_protocol import (
    SUPPORTED_VERSIONS,
    ErrorCode,
    Frame,
    FrameDecoder,
    Op,
    ProtocolError,
)
from replika_server import __version__
from replika_server.auth import Principal
from replika_server.broker import Broker
from replika_server.config import Config
from replika_server.connection_state import TRANSITIONS, FlowControl, State
from replika_server.outbox import Outbox
from replika_server.pipeline import Outcome, Pipeline
from replika_server.replies import reply_frame
from replika_server.requests import RequestError
from replika_server.store import Fetch, StoreError
from replika_server.store import Op as StoreOp
from replika_server.text import TextSession, is_text_start

__all__ = ["TRANSITIONS", "Connection", "FlowControl", "Host", "State"]

log = structlog.get_logger("replika.server")

#: Requests one connection may have waiting on the broker before we stop reading from it (pipelining bound).
MAX_INFLIGHT_REQUESTS = 10_000
#: Largest frame accepted before the handshake: a hello is small, and an unauthenticated peer must not make
#: us buffer megabytes on its behalf.
HANDSHAKE_MAX_FRAME = 64 * 1024
#: Frames decoded and answered per connection per loop turn; the rest wait, undecoded, for the next turn.
FRAMES_PER_TURN = 128
#: Seconds a connection refused at max_connections has to read why before it is cut off.
REFUSE_GRACE = 1.0
#: Seconds a closed connection may take to send its last replies before it is cut off (a peer that never reads).
CLOSE_GRACE = 5.0

_owner_ids = itertools.count(1)


class Host(Protocol):
    """What a connection needs of the server that accepted it (:class:`~replika_server.tcp.TcpServer`)."""

    @property
    def config(self) -> Config: ...
    @property
    def pipeline(self) -> Pipeline: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def dirty(self) -> list[Outbox]: ...

    def register(self, conn: Connection) -> bool:
        """Count ``conn`` in; False: refuse it (max_connections)."""

    def unregister(self, conn: Connection) -> bool:
        """Count ``conn`` out; False if it was refused."""

    def info(self) -> dict[str, object]:
        """The broker's version, uptime and such, for the text protocol's STATS."""


class Connection(asyncio.Protocol):
    """One client connection: handshake, then pipelined requests answered by correlation id."""

    def __init__(self, tcp: Host) -> None:
        self._tcp = tcp
        self._pipeline = tcp.pipeline
        self._config = tcp.config
        self._decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME, tcp.config.max_frame))
        self._loop = asyncio.get_running_loop()
        self.state = State.NEW
        self.principal: Principal | None = None  # who the handshake (or AUTH) authenticated
        self.owner = next(_owner_ids)  # the lease owner of this connection's fetches
        self.peer: object = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._out: Outbox | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_active = self._loop.time()
        self._text: TextSession | None = None
        self._parked: list[Frame] = []  # decoded, held back until the replies drain (at most FRAMES_PER_TURN)
        self._inflight = 0
        self._broken: ProtocolError | None = None  # DRAINING because the stream broke: say why at the end

    def _to(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"connection {self.owner}: no transition {self.state.name} -> {state.name}")
        self.state = state
        if state is State.CLOSED:
            self._parked.clear()  # nothing held back may run any more
            if self._out is not None:
                self._out.shut()  # nor may anything be written to a closing transport

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    # ----------------------------------------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        self._flow = FlowControl(self._transport)
        self._out = Outbox(self._transport, self._tcp.broker, self._tcp.dirty)
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # half-open peers get noticed
        if not self._tcp.register(self):
            self._refuse()
            return
        self._transport.set_write_buffer_limits(high=min(self._out.high_water, self._config.max_outbound // 2))
        self._timer = self._loop.call_later(self._config.handshake_timeout, self._on_timer)

    def _refuse(self) -> None:
        assert self._transport is not None
        limit = self._config.max_connections
        self._error(
            None, ErrorCode.TOO_MANY_CONNECTIONS, f"the broker is at its limit of {limit} connections; try again later"
        )
        self._flush()
        self._to(State.CLOSED)  # what it sends is dropped unread
        # Half-close rather than close: closing with its hello unread would reset the connection, and the reset
        # can overtake our error frame. It closes once it has read why; if it does not, we cut it off.
        if self._transport.can_write_eof():
            self._transport.write_eof()
        else:
            self._transport.close()
        self._loop.call_later(REFUSE_GRACE, self._transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tcp.unregister(self):
            self._tcp.broker.release(self.owner)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.DRAINING):
            return  # refused, closing or broken: nothing more is read
        self._last_active = self._loop.time()
        if self._text is not None:
            self._text.feed(data)
            return
        if self.state is State.NEW and data:
            if self._config.text_protocol and is_text_start(data[0]):
                self._start_text(data)
                return
            self._to(State.HANDSHAKE)
        self._consume(data)

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close (True keeps the transport open meanwhile)."""
        if self.state in (State.CLOSED, State.DRAINING):
            return False  # refused, closing or broken: let the transport close
        self._to(State.DRAINING)
        self._maybe_finish()
        return True

    def pause_writing(self) -> None:
        assert self._flow is not None
        self._flow.set(FlowControl.WRITES, True)

    def resume_writing(self) -> None:
        assert self._flow is not None
        self._flow.set(FlowControl.WRITES, False)
        if self.closed:
            return  # a closing transport drains: nothing held back may run any more
        if self._text is not None:
            self._text.resume()
        if self._parked:
            parked, self._parked = self._parked, []
            self._flow.set(FlowControl.PARKED, False)
            self._run(parked)
            if self.closed:
                return
            self._maybe_finish()
        if self._flow.holds(FlowControl.BACKLOG) and not self._parked and self._text is None:
            self._loop.call_soon(self._consume_more)
        self._tcp.broker.resume(self.owner)  # fetches held back for lack of outbound room may go now

    # ----------------------------------------------------------------------------------------------- text mode
    def _start_text(self, data: bytes) -> None:
        """A person (or a script) typing lines: hand the connection to a text session (replika_server.text)."""
        self._to(State.TEXT)
        self._text = TextSession(self, self._pipeline, self._tcp.info)
        if self._pipeline.auth is None:
            self.principal = self._pipeline.authenticate(None)
            self.text_authenticated()
        # With --auth the handshake deadline stays: AUTH within --handshake-timeout, as a binary hello.
        self._text.feed(data)

    def text_authenticated(self) -> None:
        """The text session is logged in: from now on only idleness counts, as after a binary hello."""
        self._arm_idle()

    def write_pressure(self) -> bool:
        """Replies are not being taken: the socket is full, or this turn's replies passed the high-water mark."""
        assert self._out is not None and self._flow is not None
        if self._out.over_high_water():
            self._flush()
        return self._flow.holds(FlowControl.WRITES)

    def send_text(self, data: bytes) -> None:
        if not self.closed:
            assert self._out is not None
            self._out.add(data)

    def set_text_backlog(self, full: bool) -> None:
        """A text session has lines waiting: stop reading until it catches up."""
        assert self._flow is not None
        self._flow.set(FlowControl.BACKLOG, full)
        if not full:
            self._maybe_finish()

    def begin_request(self) -> None:
        self._begin()

    def end_request(self) -> None:
        self._end()

    # ----------------------------------------------------------------------------------------------- frames
    def _consume(self, data: bytes) -> None:
        """Decode and answer up to FRAMES_PER_TURN frames. The rest stay undecoded in the decoder and reading
        pauses until the next loop turn, so that one client's burst of requests does not hold up the others."""
        assert self._flow is not None
        error: ProtocolError | None = None
        try:
            if self.principal is not None:  # the hello is done (OPEN, or DRAINING after it)
                frames = self._decoder.feed(data, max_frames=FRAMES_PER_TURN)
            else:
                frames = self._feed_before_handshake(data)
        except ProtocolError as exc:
            frames, error = exc.frames, exc
        more = error is None and len(frames) >= FRAMES_PER_TURN
        self._flow.set(FlowControl.BACKLOG, more)
        self._run(frames)
        if self.closed:
            return
        if error is not None:
            # Answer the requests that came before the corruption, then say why and close.
            self._broken = error
            if self.state is not State.DRAINING:
                self._to(State.DRAINING)
            self._flow.set(FlowControl.DRAINING, True)
        elif more and not self._parked:
            self._loop.call_soon(self._consume_more)
        self._maybe_finish()

    def _consume_more(self) -> None:
        assert self._flow is not None
        if self._text is not None or self.closed or self._parked:
            return  # the text session reads its own lines; BACKLOG is its switch
        if self._flow.holds(FlowControl.BACKLOG) and not self._flow.holds(FlowControl.WRITES):
            self._consume(b"")

    def _feed_before_handshake(self, data: bytes) -> list[Frame]:
        """Frames one at a time until the hello succeeds: before it the frame limit is small, after it the
        configured one, and frames sent right behind the hello must get the latter."""
        frames = self._decoder.feed(data, max_frames=1)
        while frames and self.principal is None:
            self._dispatch(frames[0])
            if self.closed:
                return []
            frames = self._decoder.feed(b"", max_frames=FRAMES_PER_TURN if self.principal is not None else 1)
        return frames

    def _run(self, frames: list[Frame]) -> None:
        """Dispatch ``frames`` in order. Once a turn's replies pass the high-water mark and the socket will not
        take them, the rest wait in ``_parked`` (reading paused) until it drains: what a client that does not
        read can make us buffer stays bounded, however many small requests it sent."""
        assert self._flow is not None
        for i, frame in enumerate(frames):
            if self.write_pressure():
                self._parked.extend(frames[i:])
                self._flow.set(FlowControl.PARKED, True)
                return
            self._dispatch(frame)
            if self.closed:
                return

    def _maybe_finish(self) -> None:
        """Once everything received is answered: close a broken or half-closed connection."""
        assert self._flow is not None
        if self.state is not State.DRAINING or self._inflight or self._parked:
            return
        if self._flow.holds(FlowControl.BACKLOG) or (self._text is not None and self._text.pending):
            return
        if self._broken is not None:
            self._fatal(self._broken.code, str(self._broken))
        else:
            self.close()

    # ----------------------------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Send what is buffered, then close; a peer that will not read it is cut off after a grace period."""
        self._flush()
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        if self._transport is not None:
            self._transport.close()
            if self._transport.get_write_buffer_size():
                self._loop.call_later(CLOSE_GRACE, self._transport.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def revoke(self, message: str) -> None:
        """The token this connection authenticated with was removed or changed (an auth reload)."""
        self._fatal(ErrorCode.UNAUTHORIZED, message)

    def reply_room(self) -> int:
        """Bytes of replies this connection may still be sent before it must read some (``max_outbound``)."""
        if self._transport is None or self.closed:
            return 0
        return self._config.max_outbound - self._transport.get_write_buffer_size()

    def _on_timer(self) -> None:
        """The handshake deadline, then the idle check: a connection that sent nothing and waits for nothing
        for ``idle_timeout`` seconds is closed (clients keep theirs alive with ``ping``)."""
        self._timer = None
        if self.state in (State.CLOSED, State.DRAINING):
            return
        config = self._config
        if self.principal is None:
            self._fatal(ErrorCode.HANDSHAKE_TIMEOUT, f"no handshake within {config.handshake_timeout:g} seconds")
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

    def _arm_idle(self) -> None:
        """The handshake deadline becomes the idle check (none when idle_timeout is 0)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._config.idle_timeout > 0:
            self._timer = self._loop.call_later(self._config.idle_timeout, self._on_timer)

    # ----------------------------------------------------------------------------------------------- replies
    def _send(self, obj: Frame) -> None:
        if not self.closed:
            assert self._out is not None
            self._out.add_frame(obj)

    def _flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def _error(self, rid: int | None, code: ErrorCode | str, message: str, extra: Frame | None = None) -> None:
        reply: Frame = {"id": rid, "ok": False, "code": str(code), "message": message}
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

    # ----------------------------------------------------------------------------------------------- requests
    def _dispatch(self, frame: Frame) -> None:
        rid = frame.get("id")
        if type(rid) is not int or not 0 <= rid < 2**64:
            if self.principal is None:  # before the handshake nothing is answered twice: one bad frame ends it
                self._fatal(ErrorCode.BAD_REQUEST, "the first request must be 'hello' with an unsigned integer 'id'")
                return
            self._error(None, ErrorCode.BAD_REQUEST, "every request needs an 'id': an unsigned integer")
            return
        if self.principal is None:
            self._handshake(rid, frame)
            return
        op = frame.get("op")
        if not isinstance(op, str):
            self._error(rid, ErrorCode.BAD_REQUEST, "every request needs an 'op': a string")
            return
        try:
            if op == Op.PING:
                self._send({"id": rid, "ok": True})
            elif op == Op.HELLO:
                raise RequestError(ErrorCode.BAD_REQUEST, "the handshake was already done")
            else:
                assert self.principal is not None
                admitted = self._pipeline.admit(self.principal, op, frame, self.owner)
                self._begin()
                admitted.run(functools.partial(self._done, rid, admitted.op))
        except RequestError as exc:
            self._error(rid, exc.code, exc.message, exc.extra)

    def _handshake(self, rid: int, frame: Frame) -> None:
        if frame.get("op") != Op.HELLO:
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
        principal = self._pipeline.authenticate(frame.get("token"))
        if principal is None:
            message = "a token is required" if frame.get("token") is None else "unknown token"
            log.info("unauthorized", peer=self.peer, reason=message)
            self._fatal(ErrorCode.UNAUTHORIZED, message, rid)
            return
        self.principal = principal
        if self.state is State.HANDSHAKE:  # else DRAINING: the peer half-closed right after its hello
            self._to(State.OPEN)
        config = self._config
        self._decoder.max_frame = config.max_frame
        self._arm_idle()
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
        if self._inflight == MAX_INFLIGHT_REQUESTS:
            assert self._flow is not None
            self._flow.set(FlowControl.INFLIGHT, True)

    def _end(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._last_active = self._loop.time()
        if self._inflight == MAX_INFLIGHT_REQUESTS // 2:
            assert self._flow is not None
            self._flow.set(FlowControl.INFLIGHT, False)

    def _done(self, rid: int, op: StoreOp, result: Outcome) -> None:
        self._end()
        if isinstance(result, StoreError):
            self._error(rid, result.code, result.message)
        elif not self.closed:
            assert self._out is not None
            reply = reply_frame(op, result)
            reply["id"], reply["ok"] = rid, True
            if type(op) is Fetch:
                self._out.add_deliveries(reply)
            else:
                self._out.add_frame(reply)
        if self._inflight == 0:
            self._maybe_finish()
