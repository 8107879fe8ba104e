"""Fuzzing the request dispatcher: any well-framed request, however wrong its fields, gets exactly one reply with
its id and a stable code (or succeeds), and never disturbs the server, the connection or the stored data.

Two levels: the validation functions alone (many examples, fast), and a real server fed the same kind of frames
over one connection (fewer examples, end to end).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replika
from replika_protocol import ErrorCode, Frame, FrameDecoder, encode_frame
from replika_server.requests import Limits, RequestError, fetch_op, parse_op
from tests.conftest import WAIT, serving

OPS = [
    "publish",
    "fetch",
    "ack",
    "nack",
    "reject",
    "touch",
    "declare",
    "delete_queue",
    "purge",
    "stats",
    "queues",
    "peek",
    "redrive",
    "publish_topic",
    "bind",
    "unbind",
]
FIELDS = [
    "queue",
    "payloads",
    "headers",
    "max",
    "wait",
    "lease",
    "ids",
    "tokens",
    "leases",
    "delay",
    "unseen",
    "max_attempts",
    "dead_letter",
    "max_length",
    "max_bytes",
    "overflow",
    "expired",
    "priority",
    "ttl",
    "message_ttl",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "dedup_ids",
    "dedup_window",
    "topic",
    "pattern",
    "to",
]
CODES = {c.value for c in ErrorCode}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=16)
    | st.text(max_size=12)
    | st.sampled_from(["q", "fuzz", "fuzz.dlq", "", "a" * 256, "bad name", "ü", "a.*", "#", "drop_oldest"])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | st.text(max_size=8) | scalars},
    optional={name: values for name in FIELDS},
)
LIMITS = Limits(max_batch=16, max_payload=1024, max_reply_bytes=64 * 1024)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_validation_only_ever_refuses_with_a_request_error(frame: dict[str, Any]) -> None:
    op = frame["op"]
    try:
        if op == "fetch":
            fetch, wait = fetch_op(frame, 1, LIMITS)
            assert 1 <= fetch.max <= LIMITS.max_batch and wait >= 0 and math.isfinite(wait)
        elif isinstance(op, str):
            parse_op(op, frame, 1, LIMITS)
    except RequestError as exc:
        assert exc.code.value in CODES and exc.message


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(requests, min_size=1, max_size=12))
async def test_a_real_server_answers_every_fuzzed_request_and_keeps_its_data(
    tmp_path_factory: Any, batch: list[dict[str, Any]]
) -> None:
    data_dir = Path(tmp_path_factory.mktemp("fuzz"))
    async with serving(data_dir, max_batch=16, max_payload=1024) as srv:
        async with replika.AsyncClient(srv.url) as keeper:
            await keeper.publish("kept", b"precious")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        decoder = FrameDecoder(2**31)
        frames: list[Frame] = [{"op": "hello", "id": 0, "versions": [1]}]
        frames += [{**f, "id": i} for i, f in enumerate(batch, 1)]
        for f in frames:
            wait = f.get("wait")
            if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0:
                f["wait"] = 0.01  # a valid long poll would hold the test for up to 300 s
        frames.append({"op": "ping", "id": 10_000})
        writer.write(b"".join(encode_frame(f) for f in frames))
        replies: dict[int, Frame] = {}
        expected = {f["id"] for f in frames}
        while len(replies) < len(frames):  # replies may come out of order (long polls)
            data = await asyncio.wait_for(reader.read(65536), WAIT)
            assert data, f"the server closed the connection; replies so far: {replies}"
            for reply in decoder.feed(data):
                assert reply.get("id") in expected and reply["id"] not in replies, reply
                replies[reply["id"]] = reply
        for reply in replies.values():
            assert reply["ok"] is True or reply["code"] in CODES, reply
        writer.close()
        async with replika.AsyncClient(srv.url) as keeper:
            stats = await keeper.stats("kept")
            # The fuzz may legitimately purge or delete "kept" only if it named it; it never names it.
            assert stats["total"] == 1
