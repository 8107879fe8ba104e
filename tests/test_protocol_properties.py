"""Property tests of the framing layer: round trips under any chunking, and only ProtocolError on any input."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replika_protocol import FrameDecoder, FrameTooLarge, ProtocolError, encode_frame, encode_frame_parts
from replika_protocol.framing import PASS_THROUGH

# Modest counts: the whole file runs in seconds on a 2-core machine. No deadline: timing is not the property.
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SMALL_MAX_FRAME = 64

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=64)
    | st.text(max_size=32)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
frames = st.dictionaries(st.text(max_size=16), values, max_size=6)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed), so empty chunks occur too."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


cut_lists = st.lists(st.integers(min_value=0, max_value=2**16), max_size=12)


def feed_all(dec: FrameDecoder, chunks: list[bytes]) -> tuple[list[dict[str, Any]], ProtocolError | None]:
    """Feed every chunk; every frame handed over before the first error, and that error (None when none).

    Frames that precede the corruption within the failing feed travel on the error (``ProtocolError.frames``).
    """
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        try:
            out += dec.feed(chunk)
        except ProtocolError as exc:
            return out + exc.frames, exc
    return out, None


@PROPS
@given(st.lists(frames, min_size=1, max_size=3), cut_lists)
def test_round_trip_under_any_chunking(objs: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(o) for o in objs)
    dec = FrameDecoder()
    out, err = feed_all(dec, split(stream, cuts))
    assert err is None
    assert out == objs
    assert dec.buffered == 0


@PROPS
@given(frames)
def test_round_trip_byte_by_byte(obj: dict[str, Any]) -> None:
    data = encode_frame(obj)
    dec = FrameDecoder()
    out, err = feed_all(dec, [data[i : i + 1] for i in range(len(data))])
    assert err is None
    assert out == [obj]


# Byte soup: plain random bytes, and random bodies behind a correct length prefix so that msgpack decoding (not
# just the header check) sees hostile input too.
framed_junk = st.binary(max_size=SMALL_MAX_FRAME).map(lambda b: struct.pack(">I", len(b)) + b)
soup = st.lists(st.binary(max_size=80) | framed_junk, max_size=6).map(b"".join)


@PROPS
@given(soup, cut_lists)
def test_byte_soup_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(max_frame=SMALL_MAX_FRAME)
    out, err = feed_all(dec, split(data, cuts))  # anything but ProtocolError propagates and fails the test
    for frame in out:
        assert isinstance(frame, dict)
        assert all(isinstance(k, str) for k in frame)
    if err is not None:
        # Once broken, always broken: no resynchronising on garbage, and no frame handed over twice.
        try:
            dec.feed(b"")
        except ProtocolError as again:
            assert again.frames == []
        else:
            raise AssertionError("decoder accepted input after a protocol error")


@PROPS
@given(st.lists(frames, max_size=3), cut_lists, st.binary(min_size=1, max_size=80), cut_lists)
def test_valid_stream_then_garbage_in_later_feeds(
    objs: list[dict[str, Any]], cuts: list[int], garbage: bytes, garbage_cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(o) for o in objs)
    dec = FrameDecoder(max_frame=4096)
    out, err = feed_all(dec, split(stream, cuts) + split(garbage, garbage_cuts))
    assert out[: len(objs)] == objs
    if err is None:
        assert dec.buffered <= len(garbage)


# Garbage that is certainly invalid at its start, whatever follows it.
bad_starts = st.sampled_from(
    [
        struct.pack(">I", 4097),  # declared length above the limit
        b"\xff\xff\xff\xff",
        struct.pack(">I", 3) + msgpack.packb([1, 2]),  # not a map
        struct.pack(">I", 1) + b"\xc1",  # never-used msgpack byte
        struct.pack(">I", 3) + b"\x81\x01\x02",  # int key
    ]
)


@PROPS
@given(st.lists(frames, min_size=1, max_size=3), bad_starts, st.binary(max_size=40), cut_lists)
def test_valid_frames_come_out_before_the_error_whatever_the_chunking(
    objs: list[dict[str, Any]], bad: bytes, tail: bytes, cuts: list[int]
) -> None:
    """Chunking must not change what a stream means: the frames before the corruption are always handed over.

    Otherwise whether a peer's pipelined requests ahead of a bad frame are processed depends on how TCP happened
    to segment the bytes.
    """
    stream = b"".join(encode_frame(o) for o in objs)
    dec = FrameDecoder(max_frame=4096)
    out, err = feed_all(dec, split(stream + bad + tail, cuts))
    assert out == objs
    assert err is not None
    if bad[:4] in (struct.pack(">I", 4097), b"\xff\xff\xff\xff"):
        assert isinstance(err, FrameTooLarge)


# Values that may hold big payloads, as bytes or views: encode_frame_parts passes those through uncopied.
big_payloads = st.sampled_from([PASS_THROUGH - 1, PASS_THROUGH, PASS_THROUGH + 7]).map(lambda n: b"\x07" * n)
payloads = big_payloads | big_payloads.map(lambda b: memoryview(b)[1:]) | st.binary(max_size=16)
values_with_payloads = st.recursive(
    scalars | payloads,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), values_with_payloads, max_size=4))
def test_a_frame_in_parts_is_the_frame(obj: dict[str, Any]) -> None:
    parts = encode_frame_parts(obj)
    assert b"".join(parts) == encode_frame(obj)
    big = [v for v in _leaves(obj) if isinstance(v, bytes | memoryview) and len(v) >= PASS_THROUGH]
    assert all(any(p is v for p in parts) for v in big)  # the objects themselves are pieces, not copies


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]
