"""Byte layouts of what the LMDB engine stores. Big-endian keys so that LMDB's byte order is id order."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

# msgs and state keys: (queue number u32, message id u64). A queue number, not its name, keeps keys at 12 bytes;
# numbers are never reused, so a deleted queue's stray keys can never alias a new queue.
KEY = struct.Struct(">IQ")
pack_key = KEY.pack
unpack_key = KEY.unpack
QNUM = struct.Struct(">I")

# msgs value: published_at (unix s, f64), headers length (u32), msgpack headers, then the payload bytes.
_VALUE_HEAD = struct.Struct(">dI")
VALUE_HEAD_SIZE = _VALUE_HEAD.size
_pack_head = _VALUE_HEAD.pack
_unpack_head = _VALUE_HEAD.unpack_from

# state value, present only for messages delivered at least once or delayed: attempts (u32), current lease token
# (u64), due time (unix s, f64; 0 when not delayed).
STATE = struct.Struct(">IQd")
pack_state = STATE.pack
unpack_state = STATE.unpack


def encode_message(published_at: float, payload: bytes, headers: dict[str, str] | None) -> bytes:
    if headers:
        packed: bytes = msgpack.packb(headers, use_bin_type=True)
        return _pack_head(published_at, len(packed)) + packed + payload
    return _pack_head(published_at, 0) + payload


def decode_message(value: bytes | memoryview) -> tuple[float, bytes, dict[str, str] | None]:
    published_at, hlen = _unpack_head(value)
    start = VALUE_HEAD_SIZE + hlen
    headers: Any = msgpack.unpackb(value[VALUE_HEAD_SIZE:start], raw=False) if hlen else None
    payload = value[start:]
    return published_at, payload if isinstance(payload, bytes) else bytes(payload), headers


def encode_meta(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def decode_meta(value: bytes) -> Any:
    return msgpack.unpackb(value, raw=False)
