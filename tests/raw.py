"""A raw protocol connection for tests: frames (or any bytes) sent by hand, every read bounded."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from replika_protocol import ErrorCode, Frame, FrameDecoder, encode_body, encode_frame
from tests.conftest import WAIT


def header(length: int) -> bytes:
    """The 4-byte big-endian length prefix of a frame whose body is ``length`` bytes."""
    return struct.pack(">I", length)


def padded_body(frame: Frame, size: int) -> bytes:
    """The msgpack body of ``frame`` plus a ``pad`` field sized so the body is exactly ``size`` bytes."""
    pad = size - len(encode_body({**frame, "pad": ""}))
    # Longer strings need a longer msgpack length prefix; shrink the pad until it fits exactly.
    while len(body := encode_body({**frame, "pad": "x" * pad})) > size:
        pad -= 1
    assert len(body) == size
    return body


class Raw:
    """A raw socket speaking frames by hand: send whatever bytes, read reply frames, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(2**31)
        self.frames: list[Frame] = []

    @classmethod
    async def connect(
        cls, port: int, *, hello: bool = True, token: str | None = None, tls: ssl.SSLContext | None = None
    ) -> Raw:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None), WAIT
        )
        conn = cls(reader, writer)
        if hello:
            frame: Frame = {"op": "hello", "id": 0, "versions": [1], "client": "tests"}
            if token is not None:
                frame["token"] = token
            reply = await conn.request(frame)
            assert reply["ok"] is True, reply
        return conn

    def send(self, *items: Frame | bytes) -> None:
        """Write frames (dicts, encoded here) and raw bytes, in order, as one write."""
        self.writer.write(b"".join(item if isinstance(item, bytes) else encode_frame(item) for item in items))

    async def reply(self) -> Frame:
        """The next reply frame; fails if the server closes the connection first."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "the server closed the connection where a reply was expected"
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def request(self, frame: Frame | bytes) -> Frame:
        self.send(frame)
        return await self.reply()

    async def error(self, frame: Frame | bytes, rid: int | None, code: ErrorCode) -> Frame:
        """Send ``frame``; its reply must be an error with id ``rid`` and ``code``."""
        return expect_error(await self.request(frame), rid, code)

    async def ping_ok(self, rid: int = 424242) -> None:
        """The connection still works: a ping gets ok, with its own id."""
        reply = await self.request({"op": "ping", "id": rid})
        assert reply == {"id": rid, "ok": True}

    async def until_eof(self) -> list[Frame]:
        """Every frame the server sends until it closes the connection (a reset counts as a close)."""
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            except ConnectionResetError:
                break
            if not data:
                break
            self.frames.extend(self.decoder.feed(data))
        frames, self.frames = self.frames, []
        return frames

    async def closed_after_error(self, code: ErrorCode, rid: int | None = None) -> None:
        """The server sent exactly one error frame (id ``rid``, ``code``), then closed the connection."""
        expect_error(await self.reply(), rid, code)
        extra = await self.until_eof()
        assert extra == [], f"frames after the fatal error: {extra}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


def expect_error(reply: Frame, rid: int | None, code: ErrorCode) -> Frame:
    assert reply.get("id", "missing") == rid, reply
    assert reply.get("ok") is False, reply
    assert reply.get("code") == code.value, reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply
    return reply
