"""The blocking Client against a broker process: same behaviour as the async one, through the shared core."""

from __future__ import annotations

import pytest

import replika
from tests.conftest import ServerProcess


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
