"""Length-prefixed msgpack framing, with no I/O.

A frame is a 4-byte unsigned big-endian body length followed by that many bytes holding exactly one msgpack map
with string keys. :class:`FrameDecoder` is fed whatever bytes arrive and returns every complete frame; it refuses a
declared length above its limit before allocating anything for the body. :func:`encode_frame` is the inverse.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from replika_protocol.errors import BadFrame, FrameTooLarge, ProtocolError
from replika_protocol.limits import DEFAULT_MAX_FRAME

__all__ = [
    "HEADER_SIZE",
    "PASS_THROUGH",
    "Frame",
    "FrameDecoder",
    "decode_body",
    "encode_body",
    "encode_frame",
    "encode_frame_parts",
    "frame_header",
]

Frame = dict[str, Any]

HEADER_SIZE = 4
_HEADER = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
_BIN32 = struct.Struct(">BI")  # msgpack's bin 32 header: 0xc6, then the length

#: Bytes-like values at least this long are left uncopied by :func:`encode_frame_parts`. At this length msgpack's
#: own encoding is bin 32, so the pieces join into exactly what :func:`encode_frame` makes.
PASS_THROUGH = 65536


def _refuse_ext(code: int, data: bytes) -> Any:
    raise BadFrame(f"msgpack extension type {code} is not part of the protocol")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes) -> list of frames``.

    After a :class:`ProtocolError` the stream has lost its framing; the decoder stays broken and raises again on
    every later call, so a caller cannot accidentally resynchronise on garbage.
    """

    __slots__ = ("_buf", "_error", "_max_frame", "_pos")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max_frame = max_frame
        self._error: ProtocolError | None = None

    @property
    def max_frame(self) -> int:
        """Largest accepted body length, in bytes."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview, max_frames: int | None = None) -> list[Frame]:
        """Add ``data`` to the stream and return every frame it completes, in order; at most ``max_frames``, the
        rest staying buffered for the next call (``feed(b"")`` continues), so that a caller may change
        ``max_frame`` between one frame and the next."""
        if self._error is not None:
            self._error.frames = []
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            # Fast path: nothing pending, so parse straight out of ``data`` and keep only its tail.
            view = memoryview(data).cast("B")
        frames: list[Frame] = []
        pos = self._pos if buf else 0
        end = len(view)
        try:
            while end - pos >= HEADER_SIZE:
                if max_frames is not None and len(frames) >= max_frames:
                    break
                (length,) = _unpack_header(view, pos)
                if length > self._max_frame:
                    raise FrameTooLarge(f"declared frame length {length} exceeds the limit of {self._max_frame} bytes")
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                frames.append(decode_body(view[pos + HEADER_SIZE : stop]))
                pos = stop
        except ProtocolError as exc:
            exc.frames = frames
            self._error = exc
            view.release()
            raise
        # Compact once per feed, not once per frame.
        if buf:
            view.release()
            if pos == end:
                buf.clear()
                self._pos = 0
            elif pos > 65536 or pos > len(buf) // 2:
                del buf[:pos]
                self._pos = 0
            else:
                self._pos = pos
        else:
            if pos < end:
                buf += view[pos:]
            self._pos = 0
            view.release()
        return frames


def decode_body(body: bytes | bytearray | memoryview) -> Frame:
    """Decode one frame body, which must be a single msgpack map with string keys and no extension types."""
    try:
        # max_ext_len=0 refuses every extension with data inside the unpacker, including the timestamp (type
        # -1), which msgpack would otherwise decode by itself without calling ext_hook.
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_refuse_ext, use_list=True, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a wide, version-dependent set of types for bad input
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise BadFrame(f"frame body is not valid msgpack ({detail})") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"frame body must be a msgpack map, got {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            raise BadFrame("frame map keys must be strings")
    return obj


def encode_body(obj: Frame) -> bytes:
    """The msgpack body of ``obj`` (bytes become msgpack ``bin``, str become ``str``)."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return body


def frame_header(length: int) -> bytes:
    """The 4-byte length prefix of a body of ``length`` bytes (to send a large body without copying it)."""
    return _pack_header(length)


def encode_frame(obj: Frame) -> bytes:
    """``obj`` as one complete frame: length prefix then msgpack body."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _pack_header(len(body)) + body


def encode_frame_parts(obj: Frame) -> list[bytes | bytearray | memoryview]:
    """``obj`` as one frame in pieces, for a writer that takes several buffers (``writelines``): every bytes-like
    value of at least :data:`PASS_THROUGH` bytes is its own piece, the very object, after its bin header, instead
    of being copied into the encoding. The pieces joined are what :func:`encode_frame` returns. Walks the
    structure in Python, so it pays only for frames carrying large payloads (a fetch of big messages)."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    parts: list[bytes | bytearray | memoryview] = []

    def walk(value: Any) -> None:
        if isinstance(value, bytes | bytearray | memoryview) and _nbytes(value) >= PASS_THROUGH:
            parts.append(packer.bytes() + _BIN32.pack(0xC6, _nbytes(value)))
            packer.reset()
            parts.append(value)
        elif isinstance(value, dict):
            packer.pack_map_header(len(value))
            for key, item in value.items():
                packer.pack(key)
                walk(item)
        elif isinstance(value, list | tuple):
            packer.pack_array_header(len(value))
            for item in value:
                walk(item)
        else:
            packer.pack(value)

    walk(obj)
    parts.append(packer.bytes())
    return [_pack_header(sum(map(_nbytes, parts))), *parts]


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    """Length in bytes (a memoryview's ``len`` counts its items, which need not be bytes)."""
    return data.nbytes if isinstance(data, memoryview) else len(data)
