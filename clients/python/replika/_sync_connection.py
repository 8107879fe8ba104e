"""The I/O half of the blocking :class:`replika.Client`: a plain socket under the sans-IO core.

Everything protocol is in :class:`replika._core.ClientProtocol`; this writes its bytes, reads until a call's
reply is in, and reads the replies of settles not waited for when they are there (a blocking client has no
background to read them in). Settles not waited for that are made in a ``consume()`` loop are held back in the
core until a write goes anyway, the client is about to block, or :meth:`replika._settle.Settles.due` says they
must leave (SPEC.md §5 "Settles not waited for").
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl as _ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Self

from replika._core import DEFAULT_URL, REPLY_LOOK, SETTLE_WINDOW, ClientProtocol, check, parse_url, tls_context
from replika.errors import ConnectionLost, ReplikaError
from replika_protocol import Frame

__all__ = ["SyncConnection"]

_RECV = 256 * 1024


class SyncConnection:
    """The connection of a blocking :class:`~replika.Client` (its base class): see there."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        ssl: _ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = 60.0,
        client_name: str = "replika-py-sync",
    ) -> None:
        self._endpoint = parse_url(url)
        self._ssl = tls_context(self._endpoint, ssl)
        #: The clock (seconds) that times held-back settles, the caller's pace and the connection's silence;
        #: tests replace it to move time without sleeping.
        self._clock: Callable[[], float] = time.monotonic
        self._last_io = 0.0
        self._last_read = 0.0  # when the client last read its socket, or looked and found nothing
        # consume() loops of this client whose caller holds a message now (suspended at their yield): a settle
        # made meanwhile may be held back, since the loop's next step is a call on the client sure to come.
        self._looping = 0
        # Waiters are request ids: a reply is kept in _replies until the call that sent the request reads it.
        self._core: ClientProtocol[int] = ClientProtocol(client_name, token, self._endpoint)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None  # the socket, to see without blocking whether replies are in
        self._sock_timeout: float | None = None
        self._replies: dict[int, Frame] = {}

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        error = exc[1] if len(exc) > 1 else None
        if not isinstance(error, BaseException):
            self.close()
            return
        try:  # the body's exception stays the one raised; what closing found is noted on it, not lost
            self.close()
        except ReplikaError as closing:
            error.add_note(f"closing the replika client raised {closing!r}")

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    # ----------------------------------------------------------------------------------------------- connection
    def connect(self) -> None:
        """Open the connection and do the handshake (done by ``with`` and on first use)."""
        if self._sock is not None:
            return
        ep = self._endpoint
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=self._connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {ep.host}:{ep.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=ep.host)
            except OSError as exc:  # ssl.SSLError included
                sock.close()
                raise ConnectionLost(f"TLS handshake with {ep.host}:{ep.port} failed: {exc}") from None
        # Blocking, with the kernel's timeouts instead of Python's: a socket with a Python timeout polls before
        # every send and receive, doubling the system calls of a client that writes one small ack at a time.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self._timeout))
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._sock_timeout = -1.0  # not yet set
        self._set_timeout(self._connect_timeout)
        self._core.connection_made()
        self._replies.clear()
        rid, data = self._core.hello()
        self._core.send(rid, data, rid)
        try:
            self._flush()
            self._core.on_hello(self._wait(rid, self._connect_timeout))
        except BaseException:
            self._drop()
            raise

    def flush(self) -> None:
        """Wait until every ack, nack, reject and touch made on this client before this call is durable (the
        broker committed it), then raise the first of their errors not raised yet (as :meth:`AsyncClient.flush`
        does)."""
        self._settled()
        self._raise_deferred()

    def _settled(self) -> None:
        """Read until the settles sent so far are answered, or given up with the connection; raise nothing."""
        if self._sock is None:
            return
        core = self._core
        mark = core.settle_mark()
        try:
            self._flush()
            while not core.settles.done_through(mark):
                self._receive(self._timeout)
        except ConnectionLost:
            pass  # the core recorded the settles' own ConnectionLost: the caller raises it

    def _raise_deferred(self, last: bool = False) -> None:
        """Raise the oldest error of a settle not waited for, if there is one; ``last`` (closing): with the
        others noted on it, as there will be no later call to raise them."""
        error = self._core.settles.take_error()
        if error is None:
            return
        while last and (more := self._core.settles.take_error()) is not None:
            error.add_note(f"also: {more!r}")
        raise error

    def close(self) -> None:
        """Wait for the settles not yet confirmed (as :meth:`flush` does), then close the connection. Unacked
        messages it leased become ready again at the broker. Raises the first error of a settle not waited for
        that no call has raised yet, with any others noted on it."""
        try:
            self._settled()
        finally:
            self._drop()
        self._raise_deferred(last=True)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._poll = None
                self._core.connection_lost()  # nobody waits in a blocking client once its call has raised

    def _flush(self) -> None:
        """Send every request the core has queued."""
        if self._sock is None:
            raise ConnectionLost("not connected")
        data = self._core.data_to_send()
        if not data:
            return
        try:
            self._sock.sendall(data)
            self._last_io = self._clock()
        except OSError as exc:
            self._drop()
            raise _lost(exc, self._timeout) from None

    def _set_timeout(self, timeout: float | None) -> None:
        """How long a receive may block; a system call, so only made when the value changes."""
        if timeout != self._sock_timeout and self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            self._sock_timeout = timeout

    def _wait(self, rid: int, timeout: float | None = None) -> Frame:
        """Read until the reply to ``rid`` arrives, keeping other replies for their callers."""
        while rid not in self._replies:
            self._receive(timeout if timeout is not None else self._timeout)
        return self._replies.pop(rid)

    def _receive(self, timeout: float | None) -> None:
        """Send what is queued, held-back settles included (nothing waits unsent while the client blocks), then
        read once, blocking up to ``timeout`` seconds."""
        if self._core.has_data_to_send:
            self._flush()
        self._recv_once(timeout)

    def _recv_once(self, timeout: float | None) -> None:
        """One read from the socket, its replies routed by the core; raise if the connection failed."""
        sock = self._sock
        if sock is None:
            raise ConnectionLost("not connected")
        try:
            self._set_timeout(timeout)
            data = sock.recv(_RECV)
        except OSError as exc:
            self._drop()
            raise _lost(exc, timeout) from None
        if not data:
            self._drop()
            raise ConnectionLost("the broker closed the connection")
        # A reply (of a long poll, say) restarts the broker's idle clock too.
        self._last_io = self._last_read = self._clock()
        core = self._core
        for rid, frame in core.receive_data(data):
            self._replies[rid] = frame
        if core.failure is not None:
            failure = core.failure
            self._drop()
            raise failure
        if core.has_requests_to_send:
            self._flush()  # fetches nobody waits for any more are handed back

    def _read_settles(self, now: float | None = None) -> None:
        """Read the replies of settles not waited for that are already in, without blocking; block only while
        more than SETTLE_WINDOW are unanswered. With ``now`` (a settle call's time), look only if the socket was
        not read within the last REPLY_LOOK seconds."""
        settles = self._core.settles
        while settles.unconfirmed > SETTLE_WINDOW:
            self._receive(self._timeout)
        if not settles.unconfirmed:
            return
        if now is not None:
            if now - self._last_read < REPLY_LOOK:
                return
            self._last_read = now
        if self._readable():
            self._recv_once(self._timeout)

    def _send_due(self, now: float, ahead: float = 0.0) -> None:
        """Write the settles held back if, at time ``now``, they must leave, or would have to by ``ahead`` seconds
        from now (see :meth:`replika._settle.Settles.due`)."""
        if self._core.settles.due(now, ahead):
            self._flush()

    def _readable(self) -> bool:
        sock, poll = self._sock, self._poll
        if sock is None or poll is None:
            return False
        if isinstance(sock, _ssl.SSLSocket) and sock.pending():
            return True  # decrypted already, so the descriptor may show nothing
        return bool(poll.poll(0))

    def _ensure(self, deferred: bool = True) -> None:
        """Before a call: read the replies already in and raise an error of an earlier settle not waited for
        (unless ``deferred`` is False: a settle call does that after sending its own), then make sure of a usable
        connection."""
        if deferred and self._sock is not None and self._core.settles.unconfirmed:
            self._read_settles()
        interval = self._core.keepalive_interval
        if self._sock is not None and interval is not None and self._clock() - self._last_io > 2.7 * interval:
            # The broker may have closed it as idle by now: start afresh rather than fail. Settles held back are
            # written first all the same, as the broker's own timeout may not have run out yet; either way they
            # are reported (ConnectionLost: perhaps applied), since no reply can be read on this connection.
            with contextlib.suppress(ConnectionLost):
                self._flush()
            self._drop()
        if deferred and self._core.settles.has_errors:
            self._raise_deferred()
        if self._sock is None:
            self.connect()

    def _call(self, op: str, **fields: Any) -> Frame:
        self._ensure()
        rid, data = self._core.request(op, **fields)
        return check(self._pipeline([(rid, data)])[0])

    def _pipeline(self, requests: list[tuple[int, bytes]]) -> list[Frame]:
        for rid, data in requests:
            self._core.send(rid, data, rid)
        self._flush()
        return [self._wait(rid) for rid, _ in requests]


def _timeval(seconds: float | None) -> bytes:
    """``seconds`` as SO_RCVTIMEO/SO_SNDTIMEO want it (None or 0: block without limit)."""
    if seconds is None or seconds <= 0:
        return struct.pack("I", 0) if sys.platform == "win32" else struct.pack("@ll", 0, 0)
    if sys.platform == "win32":
        return struct.pack("I", max(1, round(seconds * 1000)))
    # Split the rounded whole, not the float: rounding 4.9999996 s's fraction alone gives 1,000,000 us, which the
    # kernel refuses (EDOM). And a positive time never rounds to 0, which would mean no limit at all.
    whole, micros = divmod(max(1, round(seconds * 1_000_000)), 1_000_000)
    return struct.pack("@ll", whole, micros)


def _lost(exc: OSError, timeout: float | None) -> ConnectionLost:
    # A kernel timeout shows as EAGAIN (or, under TLS, as OpenSSL wanting to read or write).
    if isinstance(exc, BlockingIOError | TimeoutError | _ssl.SSLWantReadError | _ssl.SSLWantWriteError):
        return ConnectionLost(f"connection to the broker lost: no progress within {timeout} s")
    return ConnectionLost(f"connection to the broker lost: {exc}")
