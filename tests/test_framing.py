"""FrameDecoder, encode_frame and decode_body: the sans-IO framing layer, fed whole, split and corrupted input."""

from __future__ import annotations

import struct

import msgpack
import pytest

from replika_protocol import (
    HEADER_SIZE,
    BadFrame,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    ProtocolError,
    decode_body,
    encode_body,
    encode_frame,
)

FRAME = {"op": "publish", "id": 7, "queue": "jobs", "payloads": [b"a", b"\x00\xff"], "headers": None}


def raw_frame(body: bytes) -> bytes:
    """A length prefix and ``body``, whatever ``body`` holds."""
    return struct.pack(">I", len(body)) + body


def test_header_is_four_bytes_big_endian() -> None:
    data = encode_frame({"a": 1})
    body = msgpack.packb({"a": 1})
    assert HEADER_SIZE == 4
    assert data == len(body).to_bytes(4, "big") + body


def test_whole_frame() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(FRAME)) == [FRAME]
    assert dec.buffered == 0


def test_several_frames_in_one_feed() -> None:
    frames = [{"id": i, "op": "ping"} for i in range(5)] + [FRAME, {}]
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode_frame(f) for f in frames)) == frames
    assert dec.buffered == 0


def test_empty_feed_returns_nothing() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_frame_fed_byte_by_byte() -> None:
    data = encode_frame(FRAME)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == []
            assert dec.buffered == i + 1
        out += got
    assert out == [FRAME]
    assert dec.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_frame_split_at_every_offset(kind: type) -> None:
    second = {"op": "ack", "id": 8}
    data = encode_frame(FRAME) + encode_frame(second)
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        out = dec.feed(kind(data[:cut]))
        out += dec.feed(kind(data[cut:]))
        assert out == [FRAME, second], f"split at {cut}"
        assert dec.buffered == 0


def test_trailing_partial_frame_is_kept_for_the_next_feed() -> None:
    first, second = {"id": 1}, {"id": 2, "payload": b"x" * 100}
    tail = encode_frame(second)
    dec = FrameDecoder()
    assert dec.feed(encode_frame(first) + tail[:10]) == [first]
    assert dec.buffered == 10
    assert dec.feed(tail[10:50]) == []
    assert dec.buffered == 50
    assert dec.feed(tail[50:] + encode_frame(first)) == [second, first]
    assert dec.buffered == 0


def test_partial_header_is_kept() -> None:
    data = encode_frame(FRAME)
    dec = FrameDecoder()
    assert dec.feed(data[:3]) == []
    assert dec.buffered == 3
    assert dec.feed(data[3:]) == [FRAME]


def test_buffered_counts_unreturned_bytes_across_many_frames() -> None:
    one = encode_frame({"id": 1, "pad": b"p" * 50})
    dec = FrameDecoder()
    # Many whole frames plus a part, then the rest: exercises the compaction paths of the internal buffer.
    assert dec.feed(one[:5]) == []
    assert len(dec.feed(one[5:] + one * 40 + one[:20])) == 41
    assert dec.buffered == 20
    assert dec.feed(one[20:]) == [{"id": 1, "pad": b"p" * 50}]
    assert dec.buffered == 0


def test_declared_length_above_max_frame_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(struct.pack(">I", 101))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert isinstance(info.value, ProtocolError)


def test_declared_length_of_4_gib_is_refused_without_allocating() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\xff\xff\xff\xff")


def test_length_equal_to_max_frame_is_accepted() -> None:
    body = msgpack.packb({"k": b"v" * 50})
    dec = FrameDecoder(max_frame=len(body))
    assert dec.feed(raw_frame(body)) == [{"k": b"v" * 50}]


GARBAGE = [
    pytest.param(struct.pack(">I", 1000) + b"rest", FrameTooLarge, id="too-large"),
    pytest.param(raw_frame(msgpack.packb([1])) + b"rest", BadFrame, id="array-body"),
    pytest.param(raw_frame(b"\xc1"), BadFrame, id="bad-msgpack"),
]


def feed_until_error(dec: FrameDecoder, chunks: list[bytes]) -> tuple[list[dict[str, object]], Exception | None]:
    """Every frame handed over before the stream broke (returned, or carried by the error), and that error."""
    out: list[dict[str, object]] = []
    for chunk in chunks:
        try:
            out += dec.feed(chunk)
        except ProtocolError as exc:
            return out + exc.frames, exc
    return out, None


@pytest.mark.parametrize(("garbage", "error"), GARBAGE)
def test_trailing_garbage_fed_byte_by_byte(garbage: bytes, error: type[ProtocolError]) -> None:
    good = [{"id": 1}, FRAME]
    data = b"".join(encode_frame(f) for f in good) + garbage
    out, exc = feed_until_error(FrameDecoder(max_frame=100), [data[i : i + 1] for i in range(len(data))])
    assert out == good
    assert isinstance(exc, error)


@pytest.mark.parametrize(("garbage", "error"), GARBAGE)
def test_trailing_garbage_in_the_same_feed_still_delivers_the_frames_before_it(
    garbage: bytes, error: type[ProtocolError]
) -> None:
    # How TCP segments a stream must not decide whether the requests ahead of the corruption are processed.
    good = [{"id": 1}, FRAME]
    data = b"".join(encode_frame(f) for f in good) + garbage
    dec = FrameDecoder(max_frame=100)
    out, exc = feed_until_error(dec, [data])
    assert out == good
    assert isinstance(exc, error)
    # A broken decoder raises again, but never hands the same frames over twice.
    with pytest.raises(error) as again:
        dec.feed(encode_frame({"id": 3}))
    assert again.value.frames == []


def test_decoder_stays_broken_after_frame_too_large() -> None:
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 101))
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_frame({"id": 1}))
    with pytest.raises(FrameTooLarge):
        dec.feed(b"")


def test_non_str_keys_are_allowed_in_nested_maps() -> None:
    # SPEC §2: only the top-level keys must be str (a settle reply's ``failed`` map has uint keys).
    frame = {"id": 1, "ok": True, "failed": {7: "STALE_LEASE", 8: "STALE_LEASE"}}
    assert FrameDecoder().feed(encode_frame(frame)) == [frame]


def test_error_raised_from_the_header_alone_carries_no_frames() -> None:
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(struct.pack(">I", 101))
    assert info.value.frames == []


def test_decoder_stays_broken_after_bad_frame() -> None:
    dec = FrameDecoder()
    with pytest.raises(BadFrame):
        dec.feed(raw_frame(msgpack.packb([1, 2])))
    with pytest.raises(BadFrame):
        dec.feed(encode_frame({"id": 1}))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(msgpack.packb([1, 2, 3]), id="array"),
        pytest.param(msgpack.packb(5), id="int"),
        pytest.param(msgpack.packb("text"), id="str"),
        pytest.param(msgpack.packb(None), id="nil"),
        pytest.param(msgpack.packb(b"bin", use_bin_type=True), id="bin"),
    ],
)
def test_non_map_body_is_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame) as info:
        FrameDecoder().feed(raw_frame(body))
    assert info.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(BadFrame):
        decode_body(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x81\xa1k", id="truncated-map"),
        pytest.param(b"\x81\xa1k\x01\x02", id="extra-data"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-map-count"),
        pytest.param(b"\x81\xa2\xff\xfe\x01", id="invalid-utf8-key"),
    ],
)
def test_malformed_msgpack_is_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame):
        FrameDecoder().feed(raw_frame(body))
    with pytest.raises(BadFrame):
        decode_body(body)


def test_deeply_nested_body_is_bad_frame_not_a_crash() -> None:
    body = b"\x81\xa1k" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(BadFrame):
        FrameDecoder(max_frame=len(body)).feed(raw_frame(body))


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({1: "one"}, id="int-key"),
        pytest.param({b"k": 1}, id="bin-key"),
        pytest.param({None: 1}, id="nil-key"),
        pytest.param({"ok": 1, 2: 2}, id="mixed-keys"),
    ],
)
def test_non_str_map_key_is_bad_frame(obj: dict[object, object]) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(BadFrame):
        FrameDecoder().feed(raw_frame(body))
    with pytest.raises(BadFrame):
        decode_body(body)


@pytest.mark.parametrize("code", [0, 5, 127, -2, -128])
def test_ext_type_is_bad_frame(code: int) -> None:
    # {"v": [fixext4 of type ``code``]}, written by hand: msgpack.ExtType refuses the reserved negative types.
    body = b"\x81\xa1v\x91\xd6" + struct.pack(">b", code) + b"data"
    with pytest.raises(BadFrame):
        FrameDecoder().feed(raw_frame(body))
    with pytest.raises(BadFrame):
        decode_body(body)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(msgpack.Timestamp(1, 0), id="timestamp32"),
        pytest.param(msgpack.Timestamp(2**33, 5), id="timestamp96"),
    ],
)
def test_msgpack_timestamp_is_bad_frame(value: msgpack.Timestamp) -> None:
    # SPEC §1 and §2: extension types are refused anywhere in a frame. The timestamp (ext -1) is the one msgpack
    # decodes by itself, without calling ext_hook, so it needs refusing separately.
    body = msgpack.packb({"id": 1, "v": value})
    with pytest.raises(BadFrame):
        FrameDecoder().feed(raw_frame(body))
    with pytest.raises(BadFrame):
        decode_body(body)


@pytest.mark.parametrize(
    "ext",
    [
        pytest.param(b"\xd6\xff" + b"\x00\x00\x00\x01", id="fixext4"),
        pytest.param(b"\xd7\xff" + b"\x00" * 7 + b"\x01", id="fixext8"),
        pytest.param(b"\xc7\x0c\xff" + b"\x00" * 11 + b"\x01", id="ext8-len12"),
        pytest.param(b"\xc7\x04\xff" + b"\x00\x00\x00\x01", id="ext8-len4"),
        pytest.param(b"\xc7\x08\xff" + b"\x00" * 7 + b"\x01", id="ext8-len8"),
        pytest.param(b"\xc8\x00\x04\xff" + b"\x00\x00\x00\x01", id="ext16-len4"),
        pytest.param(b"\xc9\x00\x00\x00\x0c\xff" + b"\x00" * 11 + b"\x01", id="ext32-len12"),
    ],
)
def test_msgpack_timestamp_in_any_ext_format_is_bad_frame(ext: bytes) -> None:
    # msgpack accepts a timestamp in any ext format whose length is 4, 8 or 12, not only the canonical ones.
    body = b"\x82\xa2id\x01\xa1v\x91" + ext  # {"id": 1, "v": [ext]}
    assert isinstance(msgpack.unpackb(body)["v"][0], msgpack.Timestamp)
    with pytest.raises(BadFrame):
        FrameDecoder().feed(raw_frame(body))
    with pytest.raises(BadFrame):
        decode_body(body)


def test_round_trip_through_encode_frame_and_decode_body() -> None:
    data = encode_frame(FRAME)
    assert data[HEADER_SIZE:] == encode_body(FRAME)
    assert decode_body(data[HEADER_SIZE:]) == FRAME
    assert decode_body(memoryview(data)[HEADER_SIZE:]) == FRAME


def test_bytes_stay_bytes_and_str_stays_str() -> None:
    frame = {"bin": b"\x00\x01text", "str": "text", "empty_bin": b"", "empty_str": "", "list": [b"b", "s"]}
    body = encode_body(frame)
    # On the wire, bytes are msgpack bin and str are msgpack str.
    assert msgpack.unpackb(body, raw=True) == {
        b"bin": b"\x00\x01text",
        b"str": b"text",
        b"empty_bin": b"",
        b"empty_str": b"",
        b"list": [b"b", b"s"],
    }
    assert b"\xc4\x06\x00\x01text" in body  # bin 8 with length 6
    [got] = FrameDecoder().feed(encode_frame(frame))
    assert got == frame
    assert type(got["bin"]) is bytes and type(got["empty_bin"]) is bytes
    assert type(got["str"]) is str and type(got["empty_str"]) is str
    assert [type(v) for v in got["list"]] == [bytes, str]


def test_nested_values_round_trip() -> None:
    frame: dict[str, object] = {
        "n": None,
        "t": True,
        "f": False,
        "i": -(2**63),
        "u": 2**64 - 1,
        "x": 1.5,
        "m": {"inner": {"deep": [1, [2, {"k": b"v"}]]}},
        "l": [],
    }
    assert FrameDecoder().feed(encode_frame(frame)) == [frame]


def test_decoded_frames_do_not_alias_the_decoder_buffer() -> None:
    dec = FrameDecoder()
    data = encode_frame({"p": b"payload"})
    assert dec.feed(data[:-1]) == []
    [first] = dec.feed(data[-1:])
    dec.feed(encode_frame({"p": b"overwrite"})[:6])
    assert first == {"p": b"payload"}


def test_fed_buffer_may_be_reused_by_the_caller() -> None:
    # A transport may hand the same bytearray back refilled; the decoder must have copied what it keeps.
    second = encode_frame({"id": 2})
    chunk = bytearray(encode_frame({"id": 1}) + second[:3])
    dec = FrameDecoder()
    assert dec.feed(chunk) == [{"id": 1}]
    chunk[:] = b"\xff" * len(chunk)
    assert dec.feed(second[3:]) == [{"id": 2}]
