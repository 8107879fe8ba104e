"""Integration tests: a real broker fed bad input over raw sockets.

Each refused request must get a reply echoing its correlation id (nil when the id itself is unusable), ``ok``
false and the exact wire code; afterwards the connection either still works (framing intact) or has been closed
by the server (framing lost). Abuse on one connection must never disturb another, nor the stored messages.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import replika
from replika_protocol import ErrorCode, Frame, encode_frame
from replika_server.config import Config
from replika_server.node import Node as Server
from tests.conftest import WAIT, RunningServer
from tests.raw import Raw, expect_error, header, padded_body

# Limits of the small broker used where the defaults would need megabytes on the wire to cross them.
SMALL_FRAME = 64 * 1024
SMALL_PAYLOAD = 1024
SMALL_BATCH = 10

_CODES = {code.value for code in ErrorCode}


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A broker with small limits (frame, payload, batch), so tests can cross them cheaply."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    config = Config(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path / "d",
        max_frame=SMALL_FRAME,
        max_payload=SMALL_PAYLOAD,
        max_batch=SMALL_BATCH,
    )
    srv = await Server.start(config)
    try:
        yield srv
    finally:
        await srv.stop()
    assert not errors, f"unhandled event loop errors: {errors}"


# ------------------------------------------------------------------------------------------------ handshake
async def test_first_request_not_hello_is_refused_and_closed(server: RunningServer) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send({"op": "ping", "id": 1})
    await conn.closed_after_error(ErrorCode.BAD_REQUEST, rid=1)


@pytest.mark.parametrize(
    "fields",
    [{}, {"versions": None}, {"versions": 1}, {"versions": "1"}, {"versions": {"1": 1}}, {"versions": ["1"]}],
    ids=["missing", "nil", "int", "str", "map", "str-element"],
)
async def test_hello_without_valid_versions_is_refused_and_closed(server: RunningServer, fields: Frame) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send({"op": "hello", "id": 3, "client": "t", **fields})
    await conn.closed_after_error(ErrorCode.BAD_REQUEST, rid=3)


async def test_hello_with_unsupported_version_is_refused_and_closed(server: RunningServer) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send({"op": "hello", "id": 4, "versions": [99], "client": "t"})
    await conn.closed_after_error(ErrorCode.UNSUPPORTED_VERSION, rid=4)


async def test_second_hello_is_refused_and_connection_stays(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({"op": "hello", "id": 5, "versions": [1], "client": "t"}, 5, ErrorCode.BAD_REQUEST)
    await conn.ping_ok()
    await conn.close()


# ------------------------------------------------------------------------------------------------ envelope
async def test_unknown_op(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({"op": "frobnicate", "id": 6}, 6, ErrorCode.UNKNOWN_OP)
    await conn.ping_ok()
    await conn.close()


@pytest.mark.parametrize(
    "rid",
    [None, "7", -1, True, False, 1.5],
    ids=["missing", "str", "negative", "true", "false", "float"],
)
async def test_bad_request_id_gets_nil_id(server: RunningServer, rid: Any) -> None:
    conn = await Raw.connect(server.port)
    frame: Frame = {"op": "ping"} if rid is None else {"op": "ping", "id": rid}
    await conn.error(frame, None, ErrorCode.BAD_REQUEST)
    await conn.ping_ok()
    await conn.close()


@pytest.mark.parametrize("op", [None, 1, b"ping", ["ping"], True], ids=["missing", "int", "bin", "array", "bool"])
async def test_op_of_wrong_type(server: RunningServer, op: Any) -> None:
    conn = await Raw.connect(server.port)
    frame: Frame = {"id": 8} if op is None else {"id": 8, "op": op}
    await conn.error(frame, 8, ErrorCode.BAD_REQUEST)
    await conn.ping_ok()
    await conn.close()


# ------------------------------------------------------------------------------------------------ fields
BAD_REQUESTS: list[tuple[str, Frame]] = [
    # publish: queue name
    ("publish-no-queue", {"op": "publish", "payloads": [b"x"]}),
    ("publish-nil-queue", {"op": "publish", "queue": None, "payloads": [b"x"]}),
    ("publish-empty-queue", {"op": "publish", "queue": "", "payloads": [b"x"]}),
    ("publish-256-char-queue", {"op": "publish", "queue": "q" * 256, "payloads": [b"x"]}),
    ("publish-queue-space", {"op": "publish", "queue": "a b", "payloads": [b"x"]}),
    ("publish-queue-slash", {"op": "publish", "queue": "a/b", "payloads": [b"x"]}),
    ("publish-queue-non-ascii", {"op": "publish", "queue": "café", "payloads": [b"x"]}),
    ("publish-queue-newline", {"op": "publish", "queue": "jobs\n", "payloads": [b"x"]}),
    ("publish-queue-int", {"op": "publish", "queue": 5, "payloads": [b"x"]}),
    ("publish-queue-bin", {"op": "publish", "queue": b"jobs", "payloads": [b"x"]}),
    # publish: payloads
    ("publish-no-payloads", {"op": "publish", "queue": "jobs"}),
    ("publish-empty-payloads", {"op": "publish", "queue": "jobs", "payloads": []}),
    ("publish-payloads-bin", {"op": "publish", "queue": "jobs", "payloads": b"x"}),
    ("publish-payloads-map", {"op": "publish", "queue": "jobs", "payloads": {"a": b"x"}}),
    ("publish-payload-int", {"op": "publish", "queue": "jobs", "payloads": [b"x", 1]}),
    ("publish-payload-nil", {"op": "publish", "queue": "jobs", "payloads": [None]}),
    # publish: headers
    ("headers-too-short", {"op": "publish", "queue": "jobs", "payloads": [b"a", b"b"], "headers": [{}]}),
    ("headers-too-long", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": [{}, {}]}),
    ("headers-map-not-array", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": {"k": "v"}}),
    ("headers-int-value", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": [{"k": 1}]}),
    ("headers-bin-value", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": [{"k": b"v"}]}),
    ("headers-int-key", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": [{1: "v"}]}),
    ("headers-entry-str", {"op": "publish", "queue": "jobs", "payloads": [b"a"], "headers": ["k=v"]}),
    # fetch
    ("fetch-no-queue", {"op": "fetch"}),
    ("fetch-max-0", {"op": "fetch", "queue": "jobs", "max": 0}),
    ("fetch-max-negative", {"op": "fetch", "queue": "jobs", "max": -1}),
    ("fetch-max-float", {"op": "fetch", "queue": "jobs", "max": 1.5}),
    ("fetch-wait-negative", {"op": "fetch", "queue": "jobs", "wait": -0.5}),
    ("fetch-wait-above-300", {"op": "fetch", "queue": "jobs", "wait": 300.5}),
    ("fetch-wait-nan", {"op": "fetch", "queue": "jobs", "wait": float("nan")}),
    ("fetch-wait-inf", {"op": "fetch", "queue": "jobs", "wait": float("inf")}),
    ("fetch-wait-str", {"op": "fetch", "queue": "jobs", "wait": "1"}),
    ("fetch-lease-0", {"op": "fetch", "queue": "jobs", "lease": 0}),
    ("fetch-lease-str", {"op": "fetch", "queue": "jobs", "lease": "30"}),
    ("fetch-lease-bool", {"op": "fetch", "queue": "jobs", "lease": True}),
    # ack / nack / reject / touch
    ("ack-leases-missing", {"op": "ack", "queue": "jobs"}),
    ("ack-leases-map", {"op": "ack", "queue": "jobs", "leases": {"1": 1}}),
    ("ack-leases-int", {"op": "ack", "queue": "jobs", "leases": 1}),
    ("ack-leases-empty", {"op": "ack", "queue": "jobs", "leases": []}),
    ("ack-pair-3-elements", {"op": "ack", "queue": "jobs", "leases": [[1, 1, 1]]}),
    ("ack-pair-1-element", {"op": "ack", "queue": "jobs", "leases": [[1]]}),
    ("ack-pair-not-array", {"op": "ack", "queue": "jobs", "leases": [1]}),
    ("ack-negative-id", {"op": "ack", "queue": "jobs", "leases": [[-1, 1]]}),
    ("ack-negative-token", {"op": "ack", "queue": "jobs", "leases": [[1, -1]]}),
    ("ack-str-id", {"op": "ack", "queue": "jobs", "leases": [["1", 1]]}),
    ("ack-bool-id", {"op": "ack", "queue": "jobs", "leases": [[True, 1]]}),
    ("ack-bad-queue", {"op": "ack", "queue": "a b", "leases": [[1, 1]]}),
    ("nack-negative-delay", {"op": "nack", "queue": "jobs", "leases": [[1, 1]], "delay": -1}),
    ("nack-delay-str", {"op": "nack", "queue": "jobs", "leases": [[1, 1]], "delay": "1"}),
    ("reject-pair-3-elements", {"op": "reject", "queue": "jobs", "leases": [[1, 1, 1]]}),
    ("touch-lease-0", {"op": "touch", "queue": "jobs", "leases": [[1, 1]], "lease": 0}),
    # declare
    ("declare-max-attempts-0", {"op": "declare", "queue": "jobs", "max_attempts": 0}),
    ("declare-max-attempts-str", {"op": "declare", "queue": "jobs", "max_attempts": "3"}),
    ("declare-max-attempts-negative", {"op": "declare", "queue": "jobs", "max_attempts": -3}),
    ("declare-dead-letter-self", {"op": "declare", "queue": "jobs", "dead_letter": "jobs"}),
    ("declare-dead-letter-bad-name", {"op": "declare", "queue": "jobs", "dead_letter": "a/b"}),
    ("declare-dead-letter-int", {"op": "declare", "queue": "jobs", "dead_letter": 1}),
    # others
    ("stats-no-queue", {"op": "stats"}),
    ("stats-bad-queue", {"op": "stats", "queue": ""}),
    ("purge-bad-queue", {"op": "purge", "queue": "a b"}),
    ("delete-queue-no-queue", {"op": "delete_queue"}),
    # peek and redrive
    ("peek-no-queue", {"op": "peek"}),
    ("peek-bad-queue", {"op": "peek", "queue": "a b"}),
    ("peek-max-0", {"op": "peek", "queue": "q", "max": 0}),
    ("peek-max-float", {"op": "peek", "queue": "q", "max": 1.5}),
    ("peek-max-bool", {"op": "peek", "queue": "q", "max": True}),
    ("redrive-no-queue", {"op": "redrive"}),
    ("redrive-bad-to", {"op": "redrive", "queue": "q.dlq", "to": "a/b"}),
    ("redrive-to-int", {"op": "redrive", "queue": "q.dlq", "to": 5}),
    ("redrive-to-self", {"op": "redrive", "queue": "q.dlq", "to": "q.dlq"}),
    ("redrive-max-0", {"op": "redrive", "queue": "q.dlq", "max": 0}),
    ("redrive-max-str", {"op": "redrive", "queue": "q.dlq", "max": "5"}),
]


@pytest.mark.parametrize("frame", [f for _, f in BAD_REQUESTS], ids=[name for name, _ in BAD_REQUESTS])
async def test_invalid_fields_are_bad_requests(server: RunningServer, frame: Frame) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({**frame, "id": 9}, 9, ErrorCode.BAD_REQUEST)
    await conn.ping_ok()
    await conn.close()


async def test_invalid_requests_change_nothing(server: RunningServer) -> None:
    """Refused publishes store nothing and refused declares create no queue."""
    conn = await Raw.connect(server.port)
    for i, (_, frame) in enumerate(BAD_REQUESTS, start=100):
        reply = await conn.request({**frame, "id": i})
        assert reply["id"] == i and reply["ok"] is False, reply
    reply = await conn.request({"op": "queues", "id": 1})
    assert reply == {"id": 1, "ok": True, "queues": []}
    await conn.close()


async def test_queue_name_limits_accept_the_full_alphabet_at_255(server: RunningServer) -> None:
    """The refusals above are limits, not a broken validator: the longest and oddest valid name works."""
    conn = await Raw.connect(server.port)
    name = ("Az09._:-" * 32)[:255]
    reply = await conn.request({"op": "publish", "id": 10, "queue": name, "payloads": [b"x"]})
    assert reply["ok"] is True, reply
    reply = await conn.request({"op": "stats", "id": 11, "queue": name})
    assert reply["ok"] is True and reply["stats"]["total"] == 1, reply
    await conn.close()


async def test_stats_of_unknown_queue_is_not_found(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({"op": "stats", "id": 12, "queue": "nosuch"}, 12, ErrorCode.NOT_FOUND)
    await conn.ping_ok()
    await conn.close()


@pytest.mark.parametrize("op", ["ack", "nack", "reject", "touch"])
async def test_settle_on_unknown_queue_is_not_found(server: RunningServer, op: str) -> None:
    conn = await Raw.connect(server.port)
    await conn.error({"op": op, "id": 13, "queue": "nosuch", "leases": [[1, 1]]}, 13, ErrorCode.NOT_FOUND)
    await conn.ping_ok()
    await conn.close()


# ------------------------------------------------------------------------------------------------ limits
async def test_hello_advertises_the_configured_limits(small_server: Server) -> None:
    conn = await Raw.connect(small_server.port, hello=False)
    reply = await conn.request({"op": "hello", "id": 1, "versions": [1], "client": "t"})
    assert reply["ok"] is True, reply
    assert (reply["max_frame"], reply["max_payload"], reply["max_batch"]) == (SMALL_FRAME, SMALL_PAYLOAD, SMALL_BATCH)
    await conn.close()


async def test_payload_above_max_payload(small_server: Server) -> None:
    conn = await Raw.connect(small_server.port)
    too_big = {"op": "publish", "id": 14, "queue": "jobs", "payloads": [b"a", b"x" * (SMALL_PAYLOAD + 1)]}
    await conn.error(too_big, 14, ErrorCode.PAYLOAD_TOO_LARGE)
    too_big_str = {"op": "publish", "id": 15, "queue": "jobs", "payloads": ["é" * (SMALL_PAYLOAD // 2 + 1)]}
    await conn.error(too_big_str, 15, ErrorCode.PAYLOAD_TOO_LARGE)
    await conn.ping_ok()
    # Exactly at the limit is accepted; nothing of the refused publishes was stored.
    reply = await conn.request({"op": "publish", "id": 16, "queue": "jobs", "payloads": [b"x" * SMALL_PAYLOAD]})
    assert reply["ok"] is True and reply["count"] == 1, reply
    reply = await conn.request({"op": "stats", "id": 17, "queue": "jobs"})
    assert reply["stats"]["total"] == 1, reply
    await conn.close()


async def test_more_payloads_than_max_batch(small_server: Server) -> None:
    conn = await Raw.connect(small_server.port)
    frame = {"op": "publish", "id": 18, "queue": "jobs", "payloads": [b"x"] * (SMALL_BATCH + 1)}
    await conn.error(frame, 18, ErrorCode.BATCH_TOO_LARGE)
    await conn.ping_ok()
    reply = await conn.request({"op": "publish", "id": 19, "queue": "jobs", "payloads": [b"x"] * SMALL_BATCH})
    assert reply["ok"] is True and reply["count"] == SMALL_BATCH, reply
    await conn.close()


async def test_more_leases_than_max_batch(small_server: Server) -> None:
    conn = await Raw.connect(small_server.port)
    leases = [[i, i] for i in range(1, SMALL_BATCH + 2)]
    await conn.error({"op": "ack", "id": 20, "queue": "jobs", "leases": leases}, 20, ErrorCode.BATCH_TOO_LARGE)
    await conn.ping_ok()
    await conn.close()


async def test_frame_of_exactly_max_frame_is_accepted(small_server: Server) -> None:
    body = padded_body({"op": "ping", "id": 21}, SMALL_FRAME)
    conn = await Raw.connect(small_server.port)
    assert await conn.request(header(len(body)) + body) == {"id": 21, "ok": True}
    await conn.close()


# ------------------------------------------------------------------------------------------------ framing
async def test_declared_length_above_max_frame(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    conn.send(header(2**31))
    await conn.closed_after_error(ErrorCode.FRAME_TOO_LARGE)


async def test_declared_length_one_above_max_frame(small_server: Server) -> None:
    conn = await Raw.connect(small_server.port)
    conn.send(header(SMALL_FRAME + 1))
    await conn.closed_after_error(ErrorCode.FRAME_TOO_LARGE)


async def test_declared_length_above_max_frame_before_hello(server: RunningServer) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send(header(2**32 - 1))
    await conn.closed_after_error(ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize(
    "body",
    [
        b"\x93\x01\x02\x03",  # msgpack array [1, 2, 3]
        b"\xa4ping",  # msgpack str
        b"\xc0",  # msgpack nil
        b"\x81\x01\xa1x",  # map with an int key
        b"\x82\xa2op\xa4ping\xa2id\x01\x00",  # a valid map followed by a stray byte inside the frame
        b"\xd4\x01\x00",  # msgpack ext type 1
        b"\x81\xa2op",  # truncated map
    ],
    ids=["array", "str", "nil", "int-key", "trailing-byte", "ext", "truncated"],
)
async def test_body_that_is_not_one_msgpack_map(server: RunningServer, body: bytes) -> None:
    conn = await Raw.connect(server.port)
    conn.send(header(len(body)) + body)
    await conn.closed_after_error(ErrorCode.BAD_FRAME)


async def test_msgpack_timestamp_is_bad_framing(server: RunningServer) -> None:
    # msgpack decodes its timestamp extension without ext_hook; the decoder still refuses it (SPEC.md).
    conn = await Raw.connect(server.port)
    body = b"\x82\xa2op\xa4ping\xa2id\xd6\xff\x00\x00\x00\x01"
    conn.send(header(len(body)) + body)
    await conn.closed_after_error(ErrorCode.BAD_FRAME)


async def test_garbage_bytes(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    conn.send(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    await conn.closed_after_error(ErrorCode.BAD_FRAME)


async def test_garbage_before_hello(server: RunningServer) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    await conn.closed_after_error(ErrorCode.BAD_FRAME)


async def test_requests_before_garbage_in_the_same_write_are_answered(server: RunningServer) -> None:
    """Whether complete frames ahead of the corruption arrive in the same read as it is up to TCP; the server
    must answer them either way, then report the corruption and close."""
    conn = await Raw.connect(server.port)
    conn.send({"op": "ping", "id": 22}, {"op": "ping", "id": 23}, b"\x00\x00\x00\x03\xc1\xc1\xc1")
    frames = await conn.until_eof()
    assert frames[:2] == [{"id": 22, "ok": True}, {"id": 23, "ok": True}], frames
    assert len(frames) == 3, frames
    expect_error(frames[2], None, ErrorCode.BAD_FRAME)


def _soup(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(100, 600))


def _framed_soup(rng: random.Random) -> bytes:
    """Random bodies behind plausible small length prefixes, so the msgpack decoder sees the garbage too."""
    chunks = []
    for _ in range(rng.randrange(1, 8)):
        body = rng.randbytes(rng.randrange(0, 80))
        chunks.append(header(len(body)) + body)
    return b"".join(chunks)


def _mutated_requests(rng: random.Random) -> bytes:
    """A stream of plausible requests with a few bytes flipped: the interesting inputs random soup rarely hits."""
    frames: list[Frame] = [
        {"op": "publish", "id": 1, "queue": "fuzz", "payloads": [b"a" * 20, b"b"], "headers": [{"k": "v"}, None]},
        {"op": "fetch", "id": 2, "queue": "fuzz", "max": 5, "wait": 0, "lease": 5.0},
        {"op": "ack", "id": 3, "queue": "fuzz", "leases": [[1, 1], [2, 2]]},
        {"op": "nack", "id": 4, "queue": "fuzz", "leases": [[1, 1]], "delay": 0.5},
        {"op": "declare", "id": 5, "queue": "fuzz2", "max_attempts": 3, "dead_letter": "fuzz3"},
        {"op": "stats", "id": 6, "queue": "fuzz"},
        {"op": "touch", "id": 7, "queue": "fuzz", "leases": [[1, 1]], "lease": 1.0},
        {"op": "ping", "id": 8},
    ]
    data = bytearray(b"".join(encode_frame(f) for f in rng.sample(frames, len(frames))))
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["soup-before-hello", "soup-after-hello", "framed-soup", "mutated-requests"])
async def test_random_bytes_never_crash_the_server(server: RunningServer, kind: str, seed: int) -> None:
    rng = random.Random(f"{kind}-{seed}")
    conn = await Raw.connect(server.port, hello=kind != "soup-before-hello")
    conn.send({"mutated-requests": _mutated_requests, "framed-soup": _framed_soup}.get(kind, _soup)(rng))
    conn.writer.write_eof()  # whatever the server makes of it, it must end: by an error, or by our EOF
    for frame in await conn.until_eof():
        rid = frame.get("id")
        assert rid is None or (type(rid) is int and rid >= 0), frame
        if frame.get("ok") is not True:
            assert frame.get("ok") is False, frame
            assert frame.get("code") in _CODES and frame["code"] != ErrorCode.INTERNAL, frame
    await conn.close()
    # The broker still serves new connections (the fixture also fails on any unhandled loop exception).
    other = await Raw.connect(server.port)
    await other.ping_ok()
    await other.close()


# ------------------------------------------------------------------------------------------------ isolation
async def test_abuse_does_not_disturb_other_clients_or_stored_messages(server: RunningServer) -> None:
    async with replika.AsyncClient(server.url) as client:
        kept = await client.publish_many("kept", [f"m{i}".encode() for i in range(50)])
        before = await client.stats("kept")
        assert before["total"] == 50

        # A connection that holds a frame half-sent: its header declares 100 bytes, only 10 arrive.
        half = await Raw.connect(server.port)
        body = padded_body({"op": "ping", "id": 24}, 100)
        half.send(header(100) + body[:10])

        async def garbage() -> None:
            for data in (b"\x00\x00\x00\x03\xc1\xc1\xc1", header(2**31), b"\x00\x00\x00\x02\x92\x01"):
                conn = await Raw.connect(server.port)
                conn.send(data)
                frames = await conn.until_eof()
                assert len(frames) == 1 and frames[0]["ok"] is False and frames[0]["id"] is None, frames
                await conn.close()

        async def work() -> None:
            ids = await client.publish_many("work", [b"a", b"b", b"c"])
            msgs = await client.fetch("work", max=10)
            assert [m.id for m in msgs] == ids and [m.payload for m in msgs] == [b"a", b"b", b"c"]
            await client.ack(msgs)
            assert (await client.stats("work"))["total"] == 0

        await asyncio.wait_for(asyncio.gather(garbage(), work()), WAIT)

        after = await client.stats("kept")
        assert (after["total"], after["ready"]) == (before["total"], before["ready"]) == (50, 50)
        msgs = await client.fetch("kept", max=100)
        assert [m.id for m in msgs] == kept
        assert [m.payload for m in msgs] == [f"m{i}".encode() for i in range(50)]

    # The half-sent frame was neither dropped nor answered early: completing it gets its reply.
    assert half.frames == []
    assert await half.request(body[10:]) == {"id": 24, "ok": True}
    await half.ping_ok()
    await half.close()


# ------------------------------------------------------------------------------------------------ floods
async def test_pipelined_ping_flood(server: RunningServer) -> None:
    conn = await Raw.connect(server.port)
    n = 2000
    conn.send(*({"op": "ping", "id": i} for i in range(1, n + 1)))
    replies = [await conn.reply() for _ in range(n)]
    assert all(r["ok"] is True for r in replies)
    assert [r["id"] for r in replies] == list(range(1, n + 1))
    # Exactly n: the next reply on the wire belongs to the next request.
    await conn.ping_ok(rid=n + 1)
    await conn.close()


async def test_pipelined_mix_of_good_and_bad_requests(server: RunningServer) -> None:
    """Every request of a pipelined burst gets exactly one reply with its own id, refused or not."""
    conn = await Raw.connect(server.port)
    frames: list[Frame] = []
    expected: dict[int, str | None] = {}
    for i in range(1, 1001):
        if i % 4 == 0:
            frames.append({"op": "publish", "id": i, "queue": "mix", "payloads": [b"%d" % i]})
            expected[i] = None
        elif i % 4 == 1:
            frames.append({"op": "publish", "id": i, "queue": "bad name", "payloads": [b"x"]})
            expected[i] = ErrorCode.BAD_REQUEST.value
        elif i % 4 == 2:
            frames.append({"op": "nope", "id": i})
            expected[i] = ErrorCode.UNKNOWN_OP.value
        else:
            frames.append({"op": "ping", "id": i})
            expected[i] = None
    conn.send(*frames)
    seen: dict[int, str | None] = {}
    for _ in range(len(frames)):
        reply = await conn.reply()
        assert reply["id"] not in seen, reply
        seen[reply["id"]] = None if reply["ok"] is True else reply["code"]
    assert seen == expected
    reply = await conn.request({"op": "stats", "id": 5000, "queue": "mix"})
    assert reply["stats"]["total"] == 250, reply
    await conn.close()


async def test_a_request_without_id_before_the_handshake_is_refused_and_closed(server: RunningServer) -> None:
    conn = await Raw.connect(server.port, hello=False)
    conn.send({"op": "hello", "versions": [1]}, {"op": "hello", "id": 1, "versions": [1]})
    await conn.closed_after_error(ErrorCode.BAD_REQUEST, rid=None)
