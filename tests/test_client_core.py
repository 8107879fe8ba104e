"""The SDK's sans-IO core (replika._core) alone: bytes in, replies routed to waiters, bytes out. No sockets."""

from __future__ import annotations

import pytest

import replika
from replika._core import ClientProtocol, Endpoint, Prefetch
from replika._message import MessageData
from replika._settle import SETTLE_BATCH, SETTLE_DELAY
from replika_protocol import Frame, FrameDecoder, encode_frame

ENDPOINT = Endpoint("127.0.0.1", 8333, tls=False)


def new_core(alive: set[str] | None = None) -> ClientProtocol[str]:
    """A core whose waiters are names; with ``alive``, only those names still wait."""
    if alive is None:
        return ClientProtocol("test", None, ENDPOINT)
    return ClientProtocol("test", None, ENDPOINT, lambda w: w in alive)


def sent(core: ClientProtocol[str]) -> list[Frame]:
    return FrameDecoder().feed(core.data_to_send())


def request(core: ClientProtocol[str], waiter: str | None, op: str = "ping", fetch_queue: str | None = None) -> int:
    rid, data = core.request(op)
    core.send(rid, data, waiter, fetch_queue)
    return rid


def reply(rid: int | None, **fields: object) -> bytes:
    return encode_frame({"id": rid, "ok": True, **fields})  # fields may override ok


def test_replies_go_to_their_waiters_in_arrival_order_whatever_the_request_order() -> None:
    core = new_core()
    a, b, c = request(core, "a"), request(core, "b"), request(core, "c")
    assert [f["id"] for f in sent(core)] == [a, b, c]  # sent in order, as one buffer
    routed = core.receive_data(reply(c, x=3) + reply(999) + reply(a, x=1))  # 999: nobody asked; ignored
    assert [(w, f["x"]) for w, f in routed] == [("c", 3), ("a", 1)]
    assert core.receive_data(reply(a)) == []  # a reply is routed once
    assert core.connection_lost()[0] == ["b"]
    assert core.failure is None


def test_replies_split_anywhere_are_routed_once_complete() -> None:
    core = new_core()
    rid = request(core, "w")
    data = reply(rid, x=1)
    for byte in data[:-1]:
        assert core.receive_data(bytes([byte])) == []
    [(waiter, frame)] = core.receive_data(data[-1:])
    assert (waiter, frame["x"]) == ("w", 1)
    assert core.failure is None


def test_a_connection_level_error_fails_the_connection_after_the_replies_before_it() -> None:
    core = new_core()
    first, second = request(core, "first"), request(core, "second")
    error = encode_frame({"id": None, "ok": False, "code": "IDLE_TIMEOUT", "message": "idle"})
    routed = core.receive_data(reply(first) + error + reply(second))
    assert [w for w, _ in routed] == ["first"]
    assert isinstance(core.failure, replika.ConnectionRefusedByServer) and core.failure.code == "IDLE_TIMEOUT"
    assert core.receive_data(reply(second)) == []  # nothing more is read from a failed connection
    assert core.connection_lost()[0] == ["second"]


def test_a_corrupt_stream_fails_the_connection_after_the_replies_before_it() -> None:
    core = new_core()
    first = request(core, "first")
    request(core, "second")
    routed = core.receive_data(reply(first) + b"\x00\x00\x00\x01\xc1")  # 0xc1: never valid msgpack
    assert [w for w, _ in routed] == ["first"]
    assert isinstance(core.failure, replika.ProtocolViolation) and core.failure.code == "BAD_FRAME"


@pytest.mark.parametrize("chunk", [1, 2, 4, 1000])
def test_an_http_reply_is_recognised_whole_or_byte_by_byte(chunk: int) -> None:
    core = new_core()
    request(core, "hello")
    data = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 30\r\n\r\nInvalid HTTP request received."
    for i in range(0, len(data), chunk):
        assert core.receive_data(data[i : i + chunk]) == []
    failure = core.failure
    assert isinstance(failure, replika.NotABroker) and isinstance(failure, replika.ProtocolViolation)
    assert failure.code == "NOT_A_BROKER"
    assert "127.0.0.1:8333 answered in HTTP" in str(failure) and "8777" in str(failure)
    assert core.connection_lost()[0] == ["hello"]


def test_a_broker_reply_fed_byte_by_byte_is_not_taken_for_http() -> None:
    core = new_core()
    rid = request(core, "hello")
    data = reply(rid, server="replika")
    routed = [r for byte in data for r in core.receive_data(bytes([byte]))]
    assert [w for w, _ in routed] == ["hello"] and core.failure is None


def test_a_fetch_nobody_waits_for_is_handed_back_unseen() -> None:
    core = new_core()
    rid = request(core, "fetcher", "fetch", fetch_queue="jobs")
    other = request(core, "caller")
    sent(core)
    core.abandon(rid)
    core.abandon(other)
    msgs = [[7, 70, 1, 0.0, b"a", None], [8, 80, 1, 0.0, b"b", None]]
    assert core.receive_data(reply(rid, msgs=msgs) + reply(other, msgs=msgs)) == []
    [nack] = sent(core)  # only the fetch's messages go back: the other request was no fetch
    assert (nack["op"], nack["queue"], nack["ids"], nack["tokens"], nack["unseen"]) == (
        "nack",
        "jobs",
        [7, 8],
        [70, 80],
        True,
    )
    assert core.receive_data(reply(nack["id"])) == []  # the hand-back's own reply needs nobody


def test_a_fetch_whose_waiter_is_gone_is_handed_back_and_an_empty_one_is_not() -> None:
    alive = {"live"}
    core = new_core(alive)
    gone = request(core, "gone", "fetch", fetch_queue="q")
    empty = request(core, "gone", "fetch", fetch_queue="q")
    live = request(core, "live", "fetch", fetch_queue="q")
    sent(core)
    msgs = [[1, 10, 1, 0.0, b"x", None]]
    routed = core.receive_data(reply(gone, msgs=msgs) + reply(empty, msgs=[]) + reply(live, msgs=msgs))
    assert [w for w, _ in routed] == ["live"]
    [nack] = sent(core)
    assert (nack["ids"], nack["tokens"]) == ([1], [10])


def test_a_new_connection_starts_clean_and_request_ids_never_repeat() -> None:
    core = new_core()
    old = request(core, "old")
    core.receive_data(b"HTTP/1.1")
    assert core.failure is not None
    assert core.connection_lost()[0] == ["old"]
    core.connection_made()
    assert core.failure is None and core.data_to_send() == b""  # the old connection's unsent request is gone
    new = request(core, "new")
    assert new > old
    assert [w for w, _ in core.receive_data(reply(old) + reply(new))] == ["new"]


# ------------------------------------------------------------------------------------------ settles not waited for
def delivered(queue: str, mid: int, token: int) -> MessageData:
    return MessageData(queue, [mid, token, 1, 0.0, b"", None], None)


def test_consecutive_settles_of_one_op_and_queue_become_one_request_in_call_order() -> None:
    core = new_core()
    a, b, c, d = (delivered("q", i, 10 * i) for i in (1, 2, 3, 4))
    core.settle("ack", [a], {})
    core.settle("ack", [b, c], {})
    request(core, "stats", "stats")  # a request between settles keeps its place
    core.settle("ack", [d], {})
    core.settle("nack", [a], {"delay": 1.0})  # another op: a new request
    core.settle("ack", [delivered("other", 9, 90)], {})  # another queue: a new request
    frames = sent(core)
    assert [(f["op"], f.get("queue"), f.get("ids"), f.get("tokens")) for f in frames] == [
        ("ack", "q", [1, 2, 3], [10, 20, 30]),
        ("stats", None, None, None),
        ("ack", "q", [4], [40]),
        ("nack", "q", [1], [10]),
        ("ack", "other", [9], [90]),
    ]
    assert frames[3]["delay"] == 1.0
    assert core.settles.unconfirmed == 4  # the stats request has a waiter; the settles are tracked here


def test_a_run_of_settles_is_split_at_max_batch() -> None:
    core = new_core()
    core.max_batch = 2
    core.settle("ack", [delivered("q", i, i) for i in range(5)], {})
    assert [f["ids"] for f in sent(core)] == [[0, 1], [2, 3], [4]]


def test_settle_replies_are_taken_by_the_core_and_failures_kept_in_order() -> None:
    core = new_core()
    core.settle("ack", [delivered("q", 1, 10), delivered("q", 2, 20)], {})
    first = sent(core)[0]["id"]
    mark = core.settle_mark()
    core.settle("touch", [delivered("q", 3, 30)], {"lease": 5.0})
    second = sent(core)[0]["id"]
    core.settle("ack", [delivered("gone", 4, 40)], {})
    third = sent(core)[0]["id"]
    assert not core.settles.done_through(mark)
    assert core.receive_data(reply(first, failed={2: "STALE_LEASE"})) == []
    assert core.settles.done_through(mark) and not core.settles.done_through(core.settle_mark())
    core.receive_data(reply(second, failed={3: "STALE_LEASE"}) + reply(third, ok=False, code="NOT_FOUND"))
    assert core.settles.unconfirmed == 0
    stale = core.settles.take_error()  # two refusals in one queue, one after the other: one StaleLease
    assert isinstance(stale, replika.StaleLease) and stale.failed == {2: "STALE_LEASE", 3: "STALE_LEASE"}
    missing = core.settles.take_error()
    assert isinstance(missing, replika.NotFound) and "ack of 1 message(s) of queue 'gone'" in str(missing)
    assert core.settles.take_error() is None


def test_a_failure_is_taken_only_by_a_mark_at_or_after_its_request() -> None:
    core = new_core()
    core.settle("ack", [delivered("q", 1, 10)], {})
    mine = core.settle_mark()
    core.settle("ack", [delivered("q", 2, 20)], {})
    theirs = core.settle_mark()
    first, second = (f["id"] for f in sent(core))
    core.receive_data(reply(first) + reply(second, failed={2: "STALE_LEASE"}))
    assert core.settles.take_error(mine) is None  # the refusal is of a later request: not this waiter's
    stale = core.settles.take_error(theirs)
    assert isinstance(stale, replika.StaleLease) and stale.failed == {2: "STALE_LEASE"}


def test_settles_lost_under_a_barrier_are_the_barriers_to_raise_and_the_rest_kept() -> None:
    core = new_core()
    core.settle("ack", [delivered("q", 1, 10)], {})
    covered = core.settle_mark()
    _, lost = core.connection_lost(covered)
    assert isinstance(lost, replika.ConnectionLost) and core.settles.take_error() is None
    core.connection_made()
    core.settle("ack", [delivered("q", 2, 20)], {})
    core.settle_mark()
    core.settle("ack", [delivered("r", 3, 30)], {})  # beyond the barrier: nobody waits for it
    _, lost = core.connection_lost(covered)
    assert isinstance(lost, replika.ConnectionLost) and core.settles.take_error() is not None


def test_settles_unanswered_when_the_connection_drops_become_one_connection_lost() -> None:
    core = new_core()
    core.settle("ack", [delivered("q", 1, 10), delivered("q", 2, 20)], {})
    sent(core)
    core.settle("ack", [delivered("q", 3, 30)], {})  # queued, never sent
    assert core.connection_lost()[0] == []
    lost = core.settles.take_error()
    assert isinstance(lost, replika.ConnectionLost) and "3 settle(s)" in str(lost) and "1 of them not sent" in str(lost)
    core.connection_made()
    assert core.data_to_send() == b"" and core.settles.unconfirmed == 0


def test_settles_held_back_are_due_by_count_by_age_or_by_the_callers_pace() -> None:
    core = new_core()
    settles = core.settles
    assert not settles.due(0.0, ahead=3600.0)  # nothing held
    core.settle("ack", [delivered("q", 1, 10)], {}, at=0.0)
    assert not settles.due(0.0) and not settles.due(SETTLE_DELAY / 2)
    assert settles.due(SETTLE_DELAY)  # the oldest is SETTLE_DELAY old
    assert settles.due(0.0, ahead=SETTLE_DELAY)  # it would be by the caller's next call at its pace
    core.settle("ack", [delivered("q", 2, 20)], {}, at=SETTLE_DELAY)
    assert settles.due(SETTLE_DELAY)  # the oldest sets the age, not the newest
    assert [f["ids"] for f in sent(core)] == [[1, 2]]
    assert not settles.due(1000.0)  # written: nothing held back any more
    core.settle("ack", [delivered("q", i, i) for i in range(SETTLE_BATCH - 1)], {}, at=200.0)
    core.settle("nack", [delivered("q", 9, 9)], {}, at=200.0)  # another request, still held back
    assert settles.due(200.0)  # SETTLE_BATCH messages held, however young
    core.connection_lost()
    assert not settles.due(1000.0)  # lost with the connection (and reported), not held back any more


def test_consume_window_follows_the_callers_pace_within_its_bounds() -> None:
    window = Prefetch(500, lease=30.0)
    assert window.window == 100  # before the caller's pace is known
    assert window.want(0, 0) == 100 and window.want(60, 0) == 0 and window.want(0, 50) == 50
    for _ in range(100):
        window.handed_out(1e-5, 256)  # fast: the limit
    assert window.window == 500
    assert window.want(250, 0) == 250 and window.want(251, 0) == 0 and window.full(251) and not window.full(250)
    for _ in range(100):
        window.handed_out(1.0, 256)  # a second per message: what it finishes in a quarter of the lease
    assert window.window == 7
    for _ in range(100):
        window.handed_out(1e-5, 1024 * 1024)  # fast, but MiB payloads: 16 MiB ahead
    assert window.window == 16
    slowest = Prefetch(500, lease=1.0)
    for _ in range(50):
        slowest.handed_out(10.0, 1)
    assert slowest.window == 1 and slowest.want(0, 0) == 1 and slowest.want(0, 1) == 0
