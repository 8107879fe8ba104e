"""A connection's replies, gathered into one write per loop turn (or per batch the broker hands out).

Small replies are joined into one buffer; a large one, and the big payloads of a fetch reply (views of what the
store read), go to the transport uncopied through ``writelines``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from replika_protocol import Frame, encode_body, encode_frame_parts, frame_header

__all__ = ["WRITE_HIGH_WATER", "Outbox"]

#: Bytes of unsent replies above which a connection stops being read (asyncio's high-water mark).
WRITE_HIGH_WATER = 64 * 1024
#: Replies below this size are joined into one buffer per write; larger ones are written without a copy.
_COPY_LIMIT = 256 * 1024
#: Fetch replies of at most this many messages are checked for big payloads to pass through uncopied.
_FEW = 64


class Dispatching(Protocol):
    """Whether the broker is handing a batch's results out right now (the broker)."""

    @property
    def dispatching(self) -> bool: ...


class Outbox:
    """Replies waiting for the next write of one transport."""

    __slots__ = ("_broker", "_dirty", "_large", "_parts", "_scheduled", "_shut", "_transport", "size")

    high_water = WRITE_HIGH_WATER

    def __init__(self, transport: asyncio.Transport, broker: Dispatching, dirty: list[Outbox]) -> None:
        self._transport = transport
        self._broker = broker
        self._dirty = dirty  # outboxes the server writes once the broker has handed out a whole batch
        self._parts: list[bytes | bytearray | memoryview] = []
        self._large = False  # _parts holds a large reply: write it without joining
        self._scheduled = False
        self._shut = False
        self.size = 0  # bytes in _parts

    def shut(self) -> None:
        """The connection is closing: nothing more is taken or written."""
        self._shut = True
        self._parts.clear()

    def over_high_water(self) -> bool:
        return self.size >= WRITE_HIGH_WATER

    def add(self, data: bytes) -> None:
        """Bytes as they are (a text session's lines)."""
        if self._shut:
            return
        self._parts.append(data)
        self.size += len(data)
        self._schedule()

    def add_frame(self, obj: Frame) -> None:
        if self._shut:
            return
        body = encode_body(obj)
        self.size += len(body)
        if len(body) < _COPY_LIMIT:
            self._parts.append(frame_header(len(body)) + body)
        else:
            # A large reply is handed over as is, header and body apart: joining would copy megabytes only to
            # have the transport copy them again.
            self._parts.append(frame_header(len(body)))
            self._parts.append(body)
            self._large = True
        self._schedule()

    def add_deliveries(self, reply: Frame) -> None:
        """A fetch reply: when it carries big payloads (the store hands those out as views of what it read),
        they go to the transport uncopied, each its own buffer of one ``writelines``."""
        msgs = reply["msgs"]
        # A reply of many messages is one of small ones (they share the frame limit): not worth the look.
        if len(msgs) > _FEW or not any(type(m[4]) is memoryview for m in msgs):
            self.add_frame(reply)
            return
        if self._shut:
            return
        parts = encode_frame_parts(reply)
        self._parts.extend(parts)
        self.size += sum(map(len, parts))  # bytes: the store's views are of bytes
        self._large = True
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._broker.dispatching:
                self._dirty.append(self)  # written as soon as the whole batch is handed out
            else:
                # One write per loop turn, however many replies this turn produced.
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self.size = 0
        if self._parts and not self._shut:
            parts, self._parts = self._parts, []
            if self._large:
                self._large = False
                self._transport.writelines(parts)
            else:
                self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def reset(self) -> None:
        """After a write that failed: forget the schedule, so that the next reply schedules a new one."""
        self._scheduled = False
