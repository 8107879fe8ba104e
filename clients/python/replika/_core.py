"""The SDK's sans-IO core, shared by :class:`AsyncClient` and the blocking :class:`Client`.

:class:`ClientProtocol` is one connection's protocol with no I/O in it: it builds request frames, remembers what
each request in flight is for, and turns the bytes received into replies for their waiters. It also hands back
the messages of a fetch nobody waits for any more, and recognises a connection-level error, a corrupt stream
and a server that is not a Replika broker. The two clients only move bytes (what :meth:`data_to_send` returns
goes to the socket, what the socket gives goes to :meth:`receive_data`) and wait, so they cannot disagree on
the protocol. The module's functions are the stateless rest: where to connect, what a request may carry, and
what a reply means.
"""

from __future__ import annotations

import itertools
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from replika._message import MessageData
from replika._settle import Settles
from replika.errors import (
    BadRequest,
    ConnectionLost,
    NotABroker,
    PayloadTooLarge,
    ProtocolViolation,
    ReplikaError,
    error_from_reply,
)
from replika_protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_PAYLOAD,
    SUPPORTED_VERSIONS,
    Frame,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    is_valid_queue_name,
)

DEFAULT_URL = "replika://127.0.0.1:8777"
DEFAULT_PORT = 8777
#: The admin sidecar's default port, named in the error for a client pointed at it.
DEFAULT_ADMIN_PORT = 8333
#: How long each fetch of consume() waits on the server for a message, in seconds. Short enough to notice a
#: dead connection, long enough that an idle consumer costs next to nothing.
CONSUME_POLL = 5.0
#: Settle requests not waited for that the blocking client lets go unanswered before it reads their replies:
#: a bound on what the broker must hold for a client that only writes (it stops reading a client that does not
#: read, which would stall both). About 40 bytes of reply each.
SETTLE_WINDOW = 1024
#: Seconds between the blocking client's looks for replies of settles already in its socket, at a settle call:
#: a look is a system call (poll), which at every ack of a fast loop costs a fifth of its speed; so a reply is
#: read (and its error raised) by the first call that starts at least this long after it arrived, or sooner.
REPLY_LOOK = 0.001
#: consume()'s default ``prefetch``: the most messages it leases ahead of its caller. Deep enough that a fast
#: caller never waits on a commit (a fetch's reply waits for its commit, about 0.3-1 ms with an fsync, so a
#: window of N carries at most N/2 messages per commit); the lease and byte bounds of Prefetch keep a slow caller
#: from holding that many.
DEFAULT_PREFETCH = 500
#: consume()'s first fetch, before the caller's pace is known.
FIRST_WINDOW = 100
#: Share of a lease that the messages consume() holds ahead may take the caller to finish: the rest is margin
#: before their leases would run out while they wait.
LEASE_SHARE = 0.25
#: Payload bytes consume() aims to hold ahead at most (a window of big messages is smaller).
BUFFER_BYTES = 16 * 1024 * 1024
_SMOOTHING = 1 / 8  # weight of the newest sample in consume()'s pace averages
#: Reconnect backoff of consume(), in seconds: first delay and ceiling.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
#: What a publish takes as a payload; a str is sent as its UTF-8 bytes.
Payload = bytes | bytearray | memoryview | str

# Bytes a publish frame needs beyond its payloads: map keys, queue name, and per-payload bin headers.
_FRAME_OVERHEAD = 512
_PER_PAYLOAD_OVERHEAD = 8
# A broker's first reply starts with a 4-byte length below 16 MiB, so its first byte is 0; an HTTP server's
# (the admin sidecar's, say) starts with this.
_HTTP = b"HTTP/"

W = TypeVar("W")


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> Endpoint:
    """``replika://host:port``, or ``replikas://host:port`` for TLS (the port defaults to 8777)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("replika", "replikas"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use replika://host:port or replikas://")
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT, tls=parts.scheme == "replikas")


def tls_context(endpoint: Endpoint, ssl_option: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS context to connect with: the caller's, else the system's defaults for ``replikas://`` (which
    verify the server's certificate and name), else None (plain TCP)."""
    if ssl_option is not None:
        return ssl_option
    return ssl.create_default_context() if endpoint.tls else None


def check_queue(name: str) -> None:
    if not is_valid_queue_name(name):
        raise BadRequest(f"invalid queue name {name!r}: 1-255 characters of [A-Za-z0-9._:-]", "BAD_REQUEST")


def as_bytes(payload: Payload, limit: int) -> bytes | bytearray | memoryview:
    """``payload`` as the bytes to send (a str as UTF-8), refused before anything is sent if above ``limit``."""
    data = payload.encode() if isinstance(payload, str) else payload
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes-like or str, not {type(payload).__name__}")
    if len(data) > limit:
        raise PayloadTooLarge(f"payload of {len(data)} bytes exceeds the server's limit of {limit}")
    return data


def _always(waiter: object) -> bool:
    return True


class Prefetch:
    """How far ``consume()`` fetches ahead of its caller: at most ``limit`` messages leased ahead, and never more
    than the caller is seen to finish within LEASE_SHARE of a lease (their leases run while they wait in the
    buffer) or than BUFFER_BYTES of payload. Sans-IO: the client reports how long the caller held each message
    and asks how much to fetch now."""

    __slots__ = ("_budget", "_bytes_per_msg", "_per_msg", "limit", "window")

    def __init__(self, limit: int, lease: float) -> None:
        self.limit = max(1, limit)
        self.window = min(self.limit, FIRST_WINDOW)
        self._budget = lease * LEASE_SHARE
        self._per_msg = 0.0  # seconds the caller holds a message, averaged
        self._bytes_per_msg = 0.0

    def handed_out(self, held: float, size: int) -> None:
        """The caller took ``held`` seconds over a message of ``size`` payload bytes before asking for the next."""
        self._per_msg += (held - self._per_msg) * _SMOOTHING
        self._bytes_per_msg += (size - self._bytes_per_msg) * _SMOOTHING
        window = self.limit
        if self._per_msg > 0:
            window = min(window, int(self._budget / self._per_msg))
        if self._bytes_per_msg > 0:
            window = min(window, int(BUFFER_BYTES / self._bytes_per_msg))
        self.window = max(1, window)

    def full(self, buffered: int) -> bool:
        """Whether ``buffered`` messages leave no room worth a fetch, whatever is in flight."""
        return self.window - buffered < max(1, self.window // 2)

    def want(self, buffered: int, requested: int) -> int:
        """How many messages to fetch now (0: none yet), with ``buffered`` waiting to be handed out and
        ``requested`` asked for by fetches in flight. It fetches once half the window is free, so a caller
        faster than the broker has two fetches in flight: the broker has the next in hand when a commit ends."""
        room = self.window - buffered - requested
        return room if room >= max(1, self.window // 2) else 0


class ClientProtocol(Generic[W]):
    """One connection's protocol state: request ids, server limits, the requests in flight and their waiters.

    A waiter (``W``) is whatever the I/O layer resumes with a reply: a future for :class:`AsyncClient`, the
    request id for the blocking client. ``alive(waiter)`` says whether it still wants its reply; a fetch's
    reply that nobody wants any more has its messages handed back (:meth:`hand_back`).
    """

    def __init__(
        self, client_name: str, token: str | None, endpoint: Endpoint, alive: Callable[[W], bool] = _always
    ) -> None:
        self._ids = itertools.count(1)
        self.client_name = client_name
        self.token = token
        self.endpoint = endpoint
        self._alive = alive
        self.max_frame = DEFAULT_MAX_FRAME
        self.max_batch = DEFAULT_MAX_BATCH
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.idle_timeout = 0.0
        self.server = ""
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        #: Why the connection is unusable (a connection-level error reply, a corrupt stream, not a broker), once
        #: it is: the I/O layer fails every waiter with it and closes.
        self.failure: ReplikaError | None = None
        self._waiting: dict[int, tuple[W | None, str | None]] = {}  # rid -> (waiter or None, fetch's queue)
        self._out: list[bytes] = []
        #: Settles sent without a waiter, and their failures until the client raises them.
        self.settles = Settles()
        self._head: bytes | None = b""  # the first bytes received, until they show whether the server speaks HTTP

    def connection_made(self) -> None:
        """A new connection: nothing received, waiting or to send yet (request ids keep counting: they never
        repeat, so a late reply of an old connection can never be taken for a new request's)."""
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.failure = None
        self._waiting.clear()
        self._out.clear()
        self._head = b""

    def connection_lost(self, covered: int = 0) -> tuple[list[W], ConnectionLost | None]:
        """The connection is gone: the waiters of every request in flight, to be failed by the caller, and the
        :class:`ConnectionLost` of the settles not yet confirmed (they may or may not have been applied), if any,
        for the barriers up to request id ``covered`` to raise (see :meth:`Settles.connection_lost`)."""
        waiters = [w for w, _ in self._waiting.values() if w is not None]
        self._waiting.clear()
        return waiters, self.settles.connection_lost(covered)

    # ----------------------------------------------------------------------------------------------- sending
    def request(self, op: str, **fields: Any) -> tuple[int, bytes]:
        """A new request id and the frame of request ``op`` (not yet queued: see :meth:`send`)."""
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        return rid, encode_frame(fields)

    def send(self, rid: int, data: bytes, waiter: W | None, fetch_queue: str | None = None) -> None:
        """Queue request ``data`` (id ``rid``) to be sent; its reply goes to ``waiter`` (None: nobody needs it). A
        fetch names its queue, so that its messages can be handed back if its waiter is gone when they come."""
        if self.settles.has_open:
            self._close_settles()  # the wire keeps call order: settles queued before this go before it
        self._waiting[rid] = (waiter, fetch_queue)
        self._out.append(data)

    def settle(self, op: str, msgs: Sequence[MessageData], extra: dict[str, Any], at: float = 0.0) -> None:
        """Queue ``op`` (ack, nack, reject, touch) of ``msgs`` with the op's ``extra`` fields, without a waiter,
        settled at time ``at`` (seconds, the caller's clock: see :meth:`Settles.due`): consecutive settles of one
        op, queue and options become one request (of at most ``max_batch`` pairs) when the bytes are next taken.
        The reply is checked here; a failure waits in :attr:`settles` for the caller."""
        self.settles.add(op, msgs, extra, self._close_settles, at)

    def _close_settles(self) -> None:
        group = self.settles.take_open()
        if group is None:
            return
        step = self.max_batch
        for i in range(0, len(group.ids), step):
            ids = group.ids if len(group.ids) <= step else group.ids[i : i + step]
            tokens = group.tokens if len(group.tokens) <= step else group.tokens[i : i + step]
            rid, data = self.request(group.op, queue=group.queue, ids=ids, tokens=tokens, **group.extra)
            self.settles.sent(rid, group.op, group.queue, len(ids))
            self._out.append(data)

    def settle_mark(self) -> int:
        """Build the requests of the settles queued so far and return a mark for ``settles.done_through``."""
        self._close_settles()
        return self.settles.last_sent()

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, in order, as one buffer (one write)."""
        if self.settles.has_open:
            self._close_settles()
        self.settles.written()
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out) or self.settles.has_open

    @property
    def has_requests_to_send(self) -> bool:
        """Whether a request is queued besides the settles of the open group (which may wait: :meth:`Settles.due`),
        such as the return of a fetch nobody waits for any more."""
        return bool(self._out)

    def hello(self) -> tuple[int, bytes]:
        """The handshake request (its reply goes to :meth:`on_hello`)."""
        fields: dict[str, Any] = {"versions": list(SUPPORTED_VERSIONS), "client": self.client_name}
        if self.token is not None:
            fields["token"] = self.token
        return self.request("hello", **fields)

    def on_hello(self, reply: Frame) -> None:
        check(reply)
        self.max_frame = int(reply.get("max_frame", DEFAULT_MAX_FRAME))
        self.max_batch = int(reply.get("max_batch", DEFAULT_MAX_BATCH))
        self.max_payload = int(reply.get("max_payload", DEFAULT_MAX_PAYLOAD))
        self.server = str(reply.get("server", ""))
        self.idle_timeout = float(reply.get("idle_timeout") or 0.0)
        self.decoder.max_frame = self.max_frame

    @property
    def keepalive_interval(self) -> float | None:
        """Seconds of silence after which to ping, so the server never sees the connection idle; None: never."""
        return self.idle_timeout / 3 if self.idle_timeout > 0 else None

    # ----------------------------------------------------------------------------------------------- receiving
    def receive_data(self, data: bytes) -> list[tuple[W, Frame]]:
        """Route the bytes ``data`` received: return ``(waiter, reply)`` for each complete reply whose waiter is
        alive, in arrival order. Afterwards :attr:`failure` is set if the connection became unusable; the
        replies before the fault are still returned."""
        if self.failure is not None:
            return []
        if self._head is not None:
            data = self._sniff(data)
            if not data:
                return []
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            frames = exc.frames
            self.failure = ProtocolViolation(f"bad reply stream: {exc}", exc.code.value)
        replies: list[tuple[W, Frame]] = []
        waiting = self._waiting
        for frame in frames:
            rid = frame.get("id")
            if type(rid) is not int:
                if rid is None and frame.get("ok") is False:
                    # A connection-level error: the server closes after sending it.
                    self.failure = error_from_reply(frame)
                    break
                continue
            entry = waiting.pop(rid, None)
            if entry is None:
                self.settles.on_reply(rid, frame)  # a settle not waited for (or a reply nobody asked for)
                continue
            waiter, fetch_queue = entry
            if waiter is not None and self._alive(waiter):
                replies.append((waiter, frame))
            elif fetch_queue is not None:
                self.hand_back(fetch_queue, frame)
        return replies

    def _sniff(self, data: bytes) -> bytes:
        """``data`` with any bytes held back before it, once the start of the stream shows it is not HTTP."""
        assert self._head is not None
        head = self._head + data if self._head else data
        if len(head) < len(_HTTP) and _HTTP.startswith(head):
            self._head = head  # too short to tell yet
            return b""
        self._head = None
        if head.startswith(_HTTP):
            ep = self.endpoint
            self.failure = NotABroker(
                f"{ep.host}:{ep.port} answered in HTTP, not the Replika protocol: this looks like the broker's admin "
                f"sidecar (port {DEFAULT_ADMIN_PORT} by default). The broker listens on its own port, {DEFAULT_PORT} "
                f"unless `replika serve --port` says otherwise: use replika://{ep.host}:{DEFAULT_PORT} or that port."
            )
            return b""
        return head

    def abandon(self, rid: int) -> None:
        """Nobody waits for request ``rid`` any more: drop its reply when it comes (a fetch's messages are handed
        back then)."""
        entry = self._waiting.get(rid)
        if entry is not None:
            self._waiting[rid] = (None, entry[1])

    def hand_back(self, queue: str, reply: Frame) -> None:
        """Queue the return of a fetch reply's messages that the application never saw."""
        msgs = reply.get("msgs")
        if msgs and reply.get("ok") is True:
            self._hand_back(queue, [m[0] for m in msgs], [m[1] for m in msgs])

    def hand_back_messages(self, msgs: Iterable[MessageData]) -> None:
        """Queue the return of delivered messages never handed to the application (consume()'s prefetch)."""
        by_queue: dict[str, list[MessageData]] = {}
        for m in msgs:
            by_queue.setdefault(m.queue, []).append(m)
        for queue, batch in by_queue.items():
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i : i + self.max_batch]
                self._hand_back(queue, [m.id for m in chunk], [m.token for m in chunk])

    def _hand_back(self, queue: str, ids: list[int], tokens: list[int]) -> None:
        # A nack with unseen: this delivery is not counted as an attempt. Its reply is of no interest: if it fails,
        # the leases end with the connection or expire.
        rid, data = self.request("nack", queue=queue, ids=ids, tokens=tokens, unseen=True)
        self.send(rid, data, None)

    # ----------------------------------------------------------------------------------------------- requests
    def publish_chunks(
        self,
        queue: str,
        payloads: Sequence[bytes | bytearray | memoryview],
        headers: list[dict[str, str] | None] | None,
        dedup_ids: list[str | None] | None = None,
        op: str = "publish",
        **extra: Any,
    ) -> Iterator[tuple[int, bytes]]:
        """Publish requests for ``payloads``, split to respect the server's batch and frame limits; ``extra``
        fields (priority, delay, ttl) go in every one. ``op`` "publish_topic" sends ``queue`` as the topic."""
        if op == "publish":
            check_queue(queue)
        extra = {k: v for k, v in extra.items() if v is not None}
        budget = self.max_frame - _FRAME_OVERHEAD
        start = 0
        n = len(payloads)
        while start < n:
            size = 0
            stop = start
            while stop < n and stop - start < self.max_batch:
                item = len(payloads[stop]) + _PER_PAYLOAD_OVERHEAD
                hdrs = headers[stop] if headers is not None else None
                if hdrs:
                    item += sum(len(k.encode()) + len(v.encode()) + 10 for k, v in hdrs.items())
                if dedup_ids is not None and dedup_ids[stop] is not None:
                    item += len(str(dedup_ids[stop]).encode()) + 5
                if stop > start and size + item > budget:
                    break
                size += item
                stop += 1
            fields: dict[str, Any] = {"topic" if op == "publish_topic" else "queue": queue, **extra}
            fields["payloads"] = payloads[start:stop]
            if headers is not None:
                fields["headers"] = headers[start:stop]
            if dedup_ids is not None:
                fields["dedup_ids"] = dedup_ids[start:stop]
            yield self.request(op, **fields)
            start = stop


# --------------------------------------------------------------------------------------------------- replies
def check(reply: Frame) -> Frame:
    """``reply`` if it is a success, else raise its error."""
    if reply.get("ok") is not True:
        raise error_from_reply(reply)
    return reply


def publish_options(
    priority: int | None, delay: float | None, ttl: float | None, dedup_ids: Sequence[str | None] | None, n: int
) -> tuple[dict[str, Any], list[str | None] | None]:
    """The extra fields of a publish, checked here so that a mistake fails before anything is sent."""
    if priority is not None and (isinstance(priority, bool) or not 0 <= priority <= 9):
        raise ValueError("priority must be an int from 0 to 9")
    if dedup_ids is not None and len(dedup_ids) != n:
        raise ValueError("dedup_ids needs one entry per payload")
    return {"priority": priority or None, "delay": delay or None, "ttl": ttl}, (
        list(dedup_ids) if dedup_ids is not None else None
    )


def history_query(
    max: int, state: str | None, since: float | None, until: float | None, header: tuple[str, str] | None
) -> dict[str, Any]:
    """The fields of a ``history`` listing request (SPEC.md §5 history), for both clients."""
    return {
        "max": max,
        "state": state,
        "since": since,
        "until": until,
        "header": list(header) if header is not None else None,
    }


def publish_ids(reply: Frame) -> list[int]:
    """The id of each payload of a publish: ``ids`` when the server sent them (dedup ids), else the range."""
    check(reply)
    if reply.get("ids") is not None:
        return [int(i) for i in reply["ids"]]
    first = int(reply["first_id"])
    return list(range(first, first + int(reply["count"])))


def topic_ids(replies: Iterable[Frame]) -> dict[str, list[int]]:
    """Queue -> ids (one per payload, in order) from the replies of a topic publish's requests."""
    out: dict[str, list[int]] = {}
    for reply in replies:
        check(reply)
        for queue, ids in (reply.get("ids") or {}).items():
            out.setdefault(str(queue), []).extend(int(i) for i in ids)
    return out
