"""A connection's states and the moves between them, and the reasons its reading is paused: the small explicit
state machine of :class:`~replika_server.connection.Connection` (in the manner of h11), apart from its I/O."""

from __future__ import annotations

import asyncio
import enum

__all__ = ["TRANSITIONS", "FlowControl", "State"]


class State(enum.Enum):
    NEW = "new"  # nothing received yet: the first byte tells the binary protocol from the text one
    HANDSHAKE = "handshake"  # binary, waiting for a hello (its deadline is handshake_timeout)
    OPEN = "open"  # binary, after the hello: requests are answered by correlation id
    TEXT = "text"  # a text session (SPEC.md §12), logged in or not: the session knows
    DRAINING = "draining"  # half-closed by the peer, or its stream broke: answer what came, then close
    CLOSED = "closed"  # closing or closed (or refused): nothing more is read, run or written


#: The states each state may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.HANDSHAKE, State.TEXT, State.DRAINING, State.CLOSED}),
    State.HANDSHAKE: frozenset({State.OPEN, State.DRAINING, State.CLOSED}),
    State.OPEN: frozenset({State.DRAINING, State.CLOSED}),
    State.TEXT: frozenset({State.DRAINING, State.CLOSED}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class FlowControl:
    """Why reading is paused: reasons as bits, the transport paused while any is held."""

    __slots__ = ("_reasons", "_transport")

    WRITES = 1  # the socket does not take our replies (asyncio's pause_writing)
    INFLIGHT = 2  # connection.MAX_INFLIGHT_REQUESTS requests wait on the broker
    PARKED = 4  # decoded frames are held back until replies drain
    BACKLOG = 8  # undecoded frames (or unanswered text lines) wait for a later turn
    DRAINING = 16  # the connection is being finished

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons = 0

    def holds(self, reason: int) -> bool:
        return bool(self._reasons & reason)

    def set(self, reason: int, on: bool) -> None:
        before = self._reasons
        self._reasons = before | reason if on else before & ~reason
        if bool(before) != bool(self._reasons) and not self._transport.is_closing():
            if self._reasons:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()
