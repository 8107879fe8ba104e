"""The TCP server: bytes from sockets into broker calls, results back into bytes. Glue, nothing more.

Each :class:`Connection` parses every complete frame of a ``data_received`` at once, hands the requests to the
broker (which batches them across connections into one commit), and coalesces its replies into one write per
loop turn. A connection that does not read its replies, or pipelines without bound, is paused rather than
buffered without limit.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
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
    frame_header,
)
from replika_server import __version__
from replika_server.broker import Broker
from replika_server.config import Config
from replika_server.requests import Limits, RequestError, fetch_op, parse_op
from replika_server.store import LmdbConfig, LmdbStore, QueueStats, StoreError

__all__ = ["Connection", "Server", "run_server"]

log = structlog.get_logger("replika.server")

#: Requests one connection may have waiting on the broker before we stop reading from it (pipelining bound).
MAX_INFLIGHT_REQUESTS = 10_000
#: Seconds a graceful shutdown waits for replies to drain before closing connections anyway.
SHUTDOWN_GRACE = 5.0

_owner_ids = itertools.count(1)
#: Replies below this size are joined into one buffer per write; larger ones are written without a copy.
_COPY_LIMIT = 256 * 1024


class Connection(asyncio.Protocol):
    """One client connection: handshake, then pipelined requests answered by correlation id."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._broker = server.broker
        self._limits = server.limits
        self._decoder = FrameDecoder(server.config.max_frame)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._out_large = False  # _out holds a large reply: write it without joining
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
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ----------------------------------------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        self._broker.release(self.owner)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        error: ProtocolError | None = None
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            frames, error = exc.frames, exc
        for frame in frames:
            self._dispatch(frame)
            if self._closed:
                return
        if error is not None:
            # Answer the requests that came before the corruption, then say why and close.
            self._broken = error
            self._update_reading()
            if self._inflight == 0:
                self._fatal(error.code, str(error))

    def close(self) -> None:
        """Send what is buffered, then close."""
        self._flush()
        self._closed = True  # nothing more may be written to a closing transport
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close (True keeps the transport open meanwhile)."""
        self._eof = True
        if self._inflight == 0:
            self.close()
        return True

    def pause_writing(self) -> None:
        self._paused_by_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_by_writes = False
        self._update_reading()

    # ----------------------------------------------------------------------------------------------- replies
    def _send(self, obj: Frame) -> None:
        if self._closed:
            return
        body = encode_body(obj)
        if len(body) < _COPY_LIMIT:
            self._out.append(frame_header(len(body)) + body)
        else:
            # A large reply (a fetch of big payloads) is handed over as is, header and body apart: joining
            # would copy megabytes only to have the transport copy them again.
            self._out.append(frame_header(len(body)))
            self._out.append(body)
            self._out_large = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._broker.dispatching:
                self._server.dirty.append(self)  # written as soon as the whole batch is handed out
            else:
                # One write per loop turn, however many replies this turn produced.
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._closed and self._transport is not None:
            out, self._out = self._out, []
            if self._out_large:
                self._out_large = False
                self._transport.writelines(out)
            else:
                self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _error(self, rid: int | None, code: ErrorCode, message: str) -> None:
        self._send({"id": rid, "ok": False, "code": code.value, "message": message})

    def _fatal(self, code: ErrorCode, message: str, rid: int | None = None) -> None:
        """The byte stream is unusable: say why, then close."""
        log.info("connection_protocol_error", peer=self.peer, code=code.value, message=message)
        self._error(rid, code, message)
        self.close()

    def _update_reading(self) -> None:
        if self._transport is None or self._closed:
            return
        if self._paused_by_writes or self._paused_by_inflight or self._broken is not None:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    # ----------------------------------------------------------------------------------------------- requests
    def _dispatch(self, frame: Frame) -> None:
        rid = frame.get("id")
        if type(rid) is not int or not 0 <= rid < 2**64:
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
            if op == "fetch":
                fetch, wait = fetch_op(frame, self.owner, self._limits)
                self._begin()
                self._broker.fetch(fetch, wait, lambda r: self._done(rid, r, _fetch_reply))
            elif op == "ping":
                self._send({"id": rid, "ok": True})
            elif op == "hello":
                raise RequestError(ErrorCode.BAD_REQUEST, "the handshake was already done")
            else:
                store_op = parse_op(op, frame, self.owner, self._limits)
                fmt = _REPLIES[op]
                self._begin()
                self._broker.submit(store_op, lambda r: self._done(rid, r, fmt))
        except RequestError as exc:
            self._error(rid, exc.code, exc.message)

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
        self._ready = True
        config = self._server.config
        self._send(
            {
                "id": rid,
                "ok": True,
                "version": max(common),
                "server": f"replika {__version__}",
                "max_frame": config.max_frame,
                "max_batch": config.max_batch,
                "max_payload": config.max_payload,
                "features": [],
            }
        )

    def _begin(self) -> None:
        self._inflight += 1
        if self._inflight >= MAX_INFLIGHT_REQUESTS and not self._paused_by_inflight:
            self._paused_by_inflight = True
            self._update_reading()

    def _done(self, rid: int, result: Any, fmt: Any) -> None:
        self._inflight -= 1
        if self._paused_by_inflight and self._inflight <= MAX_INFLIGHT_REQUESTS // 2:
            self._paused_by_inflight = False
            self._update_reading()
        if isinstance(result, StoreError):
            self._error(rid, result.code, result.message)
        else:
            reply = fmt(result)
            reply["id"] = rid
            reply["ok"] = True
            self._send(reply)
        if self._inflight == 0 and not self._closed:
            if self._broken is not None:
                self._fatal(self._broken.code, str(self._broken))
            elif self._eof:
                self.close()


def _fetch_reply(result: Any) -> Frame:
    return {"msgs": result}


def _stats_reply(result: list[QueueStats]) -> Frame:
    return {"stats": result[0].as_dict()}


def _queues_reply(result: list[QueueStats]) -> Frame:
    return {"queues": [s.as_dict() for s in result]}


def _publish_reply(result: tuple[int, int]) -> Frame:
    return {"first_id": result[0], "count": result[1]}


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
    "stats": _stats_reply,
    "queues": _queues_reply,
}


class Server:
    """The listening broker: store, broker and TCP listener, started and stopped together."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.limits = Limits(config.max_batch, config.max_payload, config.max_frame - 1024)
        self.connections: set[Connection] = set()
        self.dirty: list[Connection] = []  # connections with replies from the batch being handed out
        broker.after_dispatch = self._flush_dirty
        self._listener: asyncio.Server | None = None

    @classmethod
    async def start(cls, config: Config) -> Server:
        store = await LmdbStore.open(
            LmdbConfig(
                path=config.data_dir,
                durable=config.durability == "sync",
                max_size=config.max_store_size,
                map_size=min(256 * 1024 * 1024, config.max_store_size),
                sync_interval=config.sync_interval,
            )
        )
        server = cls(config, Broker(store))
        loop = asyncio.get_running_loop()
        server._listener = await loop.create_server(
            lambda: Connection(server), config.host, config.port, reuse_address=True, backlog=1024
        )
        log.info("listening", host=config.host, port=server.port, durability=config.durability)
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
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, finish the commit in progress, answer what is queued, close connections."""
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


async def run_server(config: Config, on_ready: Callable[[Server], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. ``on_ready`` runs once listening."""
    server = await Server.start(config)
    if on_ready is not None:
        on_ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting_down")
    await server.stop()
