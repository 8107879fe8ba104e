"""The blocking Client against a broker process: same behaviour as the async one, through the shared core."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import replika
from replika._settle import SETTLE_DELAY
from replika._sync_connection import _timeval
from tests.clock import ManualClock
from tests.conftest import WAIT, RunningServer, ServerProcess


def test_blocking_round_trip(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        ids = client.publish_many("s", [b"1", b"2", b"3"])
        assert ids == [1, 2, 3]
        assert client.publish("s", "text", headers={"h": "v"}) == 4
        msgs = client.fetch("s", max=10)
        assert [m.payload for m in msgs] == [b"1", b"2", b"3", b"text"]
        assert msgs[3].headers == {"h": "v"}
        client.ack(msgs[:2])
        msgs[2].nack()
        msgs[3].reject()
        stats = client.stats("s")
        assert (stats["ready"], stats["in_flight"], stats["total"]) == (1, 0, 1)
        assert [q["queue"] for q in client.queues()] == ["s", "s.dlq"]
        with pytest.raises(replika.StaleLease):
            msgs[0].ack(wait=True)
        with pytest.raises(replika.NotFound):
            client.stats("nope")
        with pytest.raises(replika.BadRequest):
            client.publish("bad name", b"x")
        client.ping()


def test_blocking_consume_prefetches_and_hands_back_the_rest(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.publish_many("c", [str(i).encode() for i in range(30)])
        seen = []
        consumer = client.consume("c", prefetch=8)
        for msg in consumer:
            seen.append(msg.payload)
            msg.ack()
            if len(seen) == 20:
                break
        consumer.close()
        assert seen == [str(i).encode() for i in range(20)]
        stats = client.stats("c")
        assert stats["total"] == 10
        rest = client.fetch("c", max=100, wait=5)
        # Handed-back messages come first again, in order; the abandoned prefetch's are returned as it lands.
        while len(rest) < 10:
            more = client.fetch("c", max=100, wait=5)
            assert more, "messages of the abandoned prefetch never came back"
            rest += more
        assert sorted(int(m.payload) for m in rest) == list(range(20, 30))


def test_blocking_client_reports_a_dead_server(server_process: ServerProcess) -> None:
    client = replika.Client(server_process.url)
    client.connect()
    server_process.kill()
    with pytest.raises(replika.ConnectionLost):
        client.publish("q", b"x")
    with pytest.raises(replika.ConnectionLost):
        client.publish("q", b"x")  # reconnecting fails too, with the same error type, never a bare OSError
    client.close()


def test_sigterm_drains_and_exits_zero(server_process: ServerProcess) -> None:
    with replika.Client(server_process.url) as client:
        client.publish_many("t", [b"1", b"2"])
        [msg] = client.fetch("t", lease=3600)
        assert msg.payload == b"1"
        assert server_process.terminate() == 0
    server_process.start()
    with replika.Client(server_process.url) as client:
        msgs = client.fetch("t", max=10)
        assert [(m.payload, m.attempts) for m in msgs] == [(b"1", 2), (b"2", 1)]


# ----------------------------------------------------------------------------- settles held back (SPEC.md §5)
def held_client(url: str) -> tuple[replika.Client, ManualClock]:
    """A blocking client whose clock moves only when the test says: no held-back settle comes due by age unless
    the test advances it."""
    client = replika.Client(url)
    clock = ManualClock()
    client._clock = clock.monotonic
    return client, clock


def poll(condition: Callable[[], bool], what: str) -> None:
    """Wait, up to WAIT seconds, for ``condition`` to hold (it is checked on another connection or on the broker:
    the client under test must make no call meanwhile)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT} s"
        time.sleep(0.02)


def stale_delivery(client: replika.Client, queue: str) -> tuple[replika.SyncMessage, replika.SyncMessage]:
    """A message delivered twice: the first delivery's token is no longer current."""
    client.publish(queue, b"job")
    [first] = client.fetch(queue, lease=0.05)
    [second] = client.fetch(queue, wait=WAIT)  # once the first lease expired
    assert second.id == first.id and second.token != first.token
    return first, second


async def test_acks_in_a_consume_loop_are_held_and_leave_as_one_request_and_elsewhere_at_once(
    server: RunningServer,
) -> None:
    broker = server.server.broker

    def run() -> None:
        client, _ = held_client(server.url)
        with client:
            client.publish_many("held", [str(i).encode() for i in range(50)])
            consumer = client.consume("held", prefetch=50)  # one fetch of 50; the next once 25 are taken
            first = next(consumer)  # that fetch is answered, so counted
            ops = broker.batched_ops
            first.ack()  # held back: the clock stands still and fewer than SETTLE_BATCH are held
            for _ in range(19):
                next(consumer).ack()
            next(consumer).touch(lease=WAIT)  # written at once, the twenty acks before it: two requests
            poll(lambda: broker.batched_ops == ops + 2, "the held acks and the touch reached the broker")
            client.flush()
            assert broker.batched_ops == ops + 2  # nothing else was sent
            next(consumer).ack()  # held ...
            consumer.close()  # ... and written as the loop is left, with the return of the 28 not handed out
            poll(lambda: broker.batched_ops == ops + 4, "the ack held when the loop was left reached the broker")
            assert client.stats("held")["total"] == 29
            [msg] = client.fetch("held")
            ops = broker.batched_ops
            msg.ack()  # outside a consume() loop: written before it returns
            poll(lambda: broker.batched_ops == ops + 1, "the ack reached the broker with no further call")
            assert client.stats("held")["total"] == 28

    await asyncio.to_thread(run)


def test_held_acks_leave_before_consume_blocks_and_nothing_is_delivered_again(server_process: ServerProcess) -> None:
    client, _ = held_client(server_process.url)
    got: list[int] = []

    def consume() -> None:
        with client:
            for msg in client.consume("idle", prefetch=16):
                got.append(int(msg.payload))
                msg.ack()
                if len(got) == 11:
                    break

    with replika.Client(server_process.url) as other:
        other.publish_many("idle", [str(i).encode() for i in range(10)])
        consumer = threading.Thread(target=consume)
        consumer.start()
        # The consumer has taken all ten and waits in a long poll: its acks must have gone before it blocked.
        poll(lambda: other.stats("idle")["total"] == 0, "the acks held back reached the broker")
        other.publish("idle", b"10")  # lets the loop end: its last ack goes when the loop is left
        consumer.join(WAIT)
        assert not consumer.is_alive() and got == list(range(11))
        stats = other.stats("idle")
        assert (stats["total"], stats["in_flight"]) == (0, 0)
        assert other.fetch("idle") == []  # acked, not leased: nothing is delivered again


def test_held_acks_leave_by_the_first_call_settle_delay_later_or_before_a_slow_callers_next_message(
    server_process: ServerProcess,
) -> None:
    client, clock = held_client(server_process.url)
    with client, replika.Client(server_process.url) as other:
        client.publish_many("slow", [str(i).encode() for i in range(10)])
        consumer = client.consume("slow", prefetch=10)  # all ten in one fetch: no other is due for a while
        next(consumer).ack()  # held
        b = next(consumer)  # made just now: still held
        clock.advance(SETTLE_DELAY)  # the work on b takes this long
        b.ack()  # the first call SETTLE_DELAY after the first ack writes both
        poll(lambda: other.stats("slow")["total"] == 8, "the first two acks reached the broker")
        c = next(consumer)
        clock.advance(SETTLE_DELAY)  # the work on c took this long ...
        c.ack()  # ... and its ack, made just now, would be SETTLE_DELAY old by the next call at that pace:
        next(consumer)  # the iterator writes it before handing out the next message
        poll(lambda: other.stats("slow")["total"] == 7, "c's ack reached the broker while the next is worked on")
        consumer.close()


def test_the_acks_held_when_a_loop_is_left_are_written_then(server_process: ServerProcess) -> None:
    client, _ = held_client(server_process.url)
    with client, replika.Client(server_process.url) as other:
        client.publish("left", b"x")
        consumer = client.consume("left", prefetch=1)
        next(consumer).ack()  # held: the clock stands still
        consumer.close()  # nothing fetched is left to hand back, but the held ack goes
        poll(lambda: other.stats("left")["total"] == 0, "the ack held when the loop was left reached the broker")


def test_a_held_acks_stale_lease_reaches_the_barrier_or_the_next_call(server_process: ServerProcess) -> None:
    client, _ = held_client(server_process.url)
    with client:
        first, second = stale_delivery(client, "stale")
        client.publish_many("stale", [b"a", b"b"])
        consumer = client.consume("stale", prefetch=10)
        a = next(consumer)  # in the loop: settles are held back
        first.ack()
        with pytest.raises(replika.StaleLease) as info:
            client.flush()
        assert info.value.failed == {first.id: "STALE_LEASE"}
        client.flush()  # raised once
        first.ack()
        client.stats("stale")  # the held ack leaves with it, and its reply is read before the stats reply
        with pytest.raises(replika.StaleLease):
            client.publish("stale", b"never")  # the next call raises it before doing anything
        first.ack()
        with pytest.raises(replika.StaleLease):
            second.ack(wait=True)  # its own ack is applied; the earlier failure is raised here
        a.ack()
        consumer.close()  # b goes back
        assert client.stats("stale")["total"] == 1


def test_connection_lost_with_acks_held_back_is_raised_by_the_barrier(server_process: ServerProcess) -> None:
    client, _ = held_client(server_process.url)
    client.connect()
    client.publish_many("lost", [b"1", b"2"])
    consumer = client.consume("lost", prefetch=10)
    next(consumer).ack()  # held back
    next(consumer).ack()
    server_process.kill()
    with pytest.raises(replika.ConnectionLost, match="2 settle"):
        client.flush()  # never claims the acks durable
    consumer.close()
    client.close()  # already raised: nothing more
    server_process.start()
    with replika.Client(server_process.url) as other:  # the acks were never applied: delivered again
        assert sorted(m.payload for m in other.fetch("lost", max=2, wait=WAIT)) == [b"1", b"2"]


def test_acks_held_when_a_quiet_connection_is_replaced_are_reported_not_dropped(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "d", "--idle-timeout", "60").start()
    try:
        client, clock = held_client(proc.url)
        with client:
            client.publish("quiet", b"x")
            consumer = client.consume("quiet", prefetch=10, lease=WAIT)
            next(consumer).ack()  # held back ...
            clock.advance(0.95 * 60)  # ... while the caller is away longer than the broker lets a connection idle
            with pytest.raises(replika.ConnectionLost, match="1 settle"):
                client.stats("quiet")  # replaced before the call: the held ack cannot be confirmed any more
            consumer.close()
            assert client.stats("quiet")["total"] in (0, 1)  # written before the drop: it may have been applied
    finally:
        proc.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="a timeval is POSIX's")
@pytest.mark.parametrize("seconds", [4.9999996, 0.25, 1e-9])
def test_a_receive_timeout_is_one_the_kernel_takes(seconds: float) -> None:
    # A wait's time left is any float: a fraction that rounds up to a whole second once made setsockopt fail with
    # EDOM (seen as CONNECTION_LOST mid-consume), and a tiny one that rounds to 0 would mean "no limit".
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("@ll"))
    whole, micros = struct.unpack("@ll", raw)
    kept = whole + micros / 1e6  # the kernel keeps it in clock ticks: up to 10 ms more
    assert kept > 0 and seconds <= kept + 1e-6 < seconds + 0.011
