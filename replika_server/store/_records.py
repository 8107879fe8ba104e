"""Byte layouts of what the LMDB engine stores. Big-endian keys so that LMDB's byte order is id order."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from replika_server.store.base import VIEW_THRESHOLD

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
unpack_head = _VALUE_HEAD.unpack_from

# state value, present only for messages delivered at least once, delayed or given a TTL: attempts (u32), current
# lease token (u64), due time (unix s, f64; 0 when not delayed). The extended form adds the message's own expiry
# (unix s, f64; 0: none) and its priority (u8); it is written only when either is set, so that the common record
# stays 20 bytes and stores written before priorities and TTLs read unchanged. The length tells them apart.
STATE = struct.Struct(">IQd")
pack_state = STATE.pack
unpack_state = STATE.unpack
STATE_EXT = struct.Struct(">IQddB")
pack_state_ext = STATE_EXT.pack
unpack_state_ext = STATE_EXT.unpack

# dedup key: queue number (u32) then the dedup id's UTF-8 bytes; value: when it was first seen (unix s, f64) and
# the id of the message stored then (u64).
DEDUP = struct.Struct(">dQ")
pack_dedup = DEDUP.pack
unpack_dedup = DEDUP.unpack


def dedup_key(qnum: int, dedup_id: str) -> bytes:
    return QNUM.pack(qnum) + dedup_id.encode()


def published_at_of(value: bytes | memoryview) -> float:
    """The publish time (unix s) of a stored message value, without decoding the rest."""
    published_at: float = unpack_head(value)[0]
    return published_at


def encode_message(published_at: float, payload: bytes, headers: dict[str, str] | None) -> bytes:
    if headers:
        packed: bytes = msgpack.packb(headers, use_bin_type=True)
        return _pack_head(published_at, len(packed)) + packed + payload
    return _pack_head(published_at, 0) + payload


def decode_message(value: bytes | memoryview) -> tuple[float, bytes, dict[str, str] | None]:
    published_at, hlen = unpack_head(value)
    start = VALUE_HEAD_SIZE + hlen
    headers: Any = msgpack.unpackb(value[VALUE_HEAD_SIZE:start], raw=False) if hlen else None
    payload = value[start:]
    return published_at, payload if isinstance(payload, bytes) else bytes(payload), headers


def decode_delivered(value: bytes | memoryview) -> tuple[float, bytes | memoryview, dict[str, str] | None]:
    """:func:`decode_message` for a delivery: a payload of at least ``VIEW_THRESHOLD`` bytes is a view of
    ``value`` (which the caller must own: bytes, not a view into LMDB's map), not a copy of it. The reply
    passes it to the transport uncopied too, so a big message is copied once on its way out, not three times."""
    if isinstance(value, bytes):
        published_at, hlen = unpack_head(value)
        start = VALUE_HEAD_SIZE + hlen
        if len(value) - start >= VIEW_THRESHOLD:
            headers: Any = msgpack.unpackb(value[VALUE_HEAD_SIZE:start], raw=False) if hlen else None
            return published_at, memoryview(value)[start:], headers
    return decode_message(value)


def encode_meta(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def decode_meta(value: bytes) -> Any:
    return msgpack.unpackb(value, raw=False)
