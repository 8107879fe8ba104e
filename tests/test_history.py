"""Message history end to end: a queue declared with history through the SDK, a message's life through a real
broker (``replika serve`` as a child process), read back with the SDK and the ``replika trace``/``history``
commands, the admin API and GraphQL, under the peek permission; and bad history requests refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import replika
from tests.conftest import WAIT, ServerProcess, serving
from tests.test_cli import cli, ok
from tests.tokens import ADMIN, ORDERS, READER


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("history") / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


def until_total(client: replika.Client, queue: str, total: int) -> None:
    """Wait (bounded) for the broker to end a closed connection's lease and move its message."""
    deadline = time.monotonic() + WAIT
    while client.stats(queue)["total"] != total:
        assert time.monotonic() < deadline, f"{queue} never reached {total} messages"
        time.sleep(0.02)


def test_a_life_reads_back_through_the_sdk_and_the_cli(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.declare("life", max_attempts=2, dead_letter="life.dlq", history=True)
        client.declare("life.dlq", history={"retention": 3600, "payloads": True})
        mid = client.publish("life", b"job", headers={"trace": "t-1"})
        [first] = client.fetch("life", max=1, wait=WAIT)
        client.nack([first], delay=0)
        client.flush()
        with replika.Client(broker.url) as other:
            [second] = other.fetch("life", max=1, wait=WAIT)
            assert second.attempts == 2
        until_total(client, "life.dlq", 1)  # its connection closed at max_attempts: dead-lettered
        assert client.redrive("life.dlq") == 1
        [third] = client.fetch("life", max=1, wait=WAIT)
        client.ack([third])
        client.flush()
        h = client.history("life", mid)
        kinds = [e["kind"] for e in h["events"]]
        assert kinds == ["published", "delivered", "nacked", "delivered", "lease_expired", "dead_lettered"]
        assert h["headers"] == {"trace": "t-1"} and h["state"] == "dead_lettered"
        assert h["events"][0]["by"] == "anonymous" and h["events"][0]["connection"] > 0
        assert h["events"][4]["closed"] is True and h["events"][5]["reason"] == "max_attempts"
        in_dlq = client.history("life.dlq", h["events"][5]["id"])
        assert [e["kind"] for e in in_dlq["events"]] == ["published", "redriven"] and in_dlq["payload"] == b"job"
        back = client.history("life", third.id)
        assert [e["kind"] for e in back["events"]] == ["published", "delivered", "acked"]
        listed = client.history_list("life", header=("trace", "t-1"))
        assert [m["id"] for m in listed] == [third.id, mid]  # the redriven copy keeps its headers
        assert [m["id"] for m in client.history_list("life", state="acked")] == [third.id]

    lines = ok(cli("trace", "life", str(mid), url=broker.url)).splitlines()
    assert lines[0] == f"life {mid}: dead_lettered"
    assert [line.split()[1] for line in lines[1:]] == kinds
    assert "reason=max_attempts" in lines[-1] and "to=life.dlq" in lines[-1]
    assert json.loads(ok(cli("trace", "life", str(mid), "--json", url=broker.url)))["id"] == mid
    rows = ok(cli("history", "life", "--state", "dead_lettered", url=broker.url)).splitlines()
    assert [row.split()[0] for row in rows] == [str(mid)]
    rows = ok(cli("history", "life", "--header", "trace=t-1", "--since", "0", url=broker.url)).splitlines()
    assert [row.split()[0] for row in rows] == [str(third.id), str(mid)]
    missing = cli("trace", "life", "999", url=broker.url)
    assert missing.returncode != 0 and b"NOT_FOUND" in missing.stderr


def test_bad_history_requests_are_refused(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        with pytest.raises(replika.BadRequest):
            client.declare("bad-h", history={"retention": -1})
        with pytest.raises(replika.BadRequest):
            client.declare("bad-h", history={"max_messages": 0})
        with pytest.raises(replika.BadRequest):
            client.declare("bad-h", history={"colour": "blue"})
        client.declare("bad-h", history=True)
        with pytest.raises(replika.BadRequest):
            client.history_list("bad-h", state="lost")
        with pytest.raises(replika.NotFound):
            client.history("bad-h", 1)
        plain = client.publish("no-history", b"x")
        with pytest.raises(replika.NotFound):
            client.history("no-history", plain)


async def test_the_admin_api_and_graphql_show_a_life_and_need_peek_permission(tmp_path: Path, auth_file: Path) -> None:
    async with serving(tmp_path / "d", admin_port=0, auth=auth_file) as srv:
        async with replika.AsyncClient(srv.url, ADMIN) as client:
            await client.declare("orders.eu", max_attempts=1, history={"payloads": True})
            await client.declare("orders.eu.dlq", history=True)
            mid = await client.publish("orders.eu", b"\xffbin", headers={"trace": "t-9"})
            [m] = await client.fetch("orders.eu", max=1, wait=WAIT)
            await client.nack([m], delay=0)  # its one attempt: dead-lettered
            await client.flush()
            assert await client.redrive("orders.eu.dlq") == 1
            [again] = await client.fetch("orders.eu", max=1, wait=WAIT)
            await client.ack([again])
            await client.flush()
        base = f"http://127.0.0.1:{srv.server.admin_port}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=WAIT) as h:
            got = (await h.get(f"/api/queues/orders.eu/messages/{mid}")).json()
            assert [e["kind"] for e in got["events"]] == ["published", "delivered", "nacked", "dead_lettered"]
            assert (got["state"], got["payload"], got["encoding"]) == ("dead_lettered", "/2Jpbg==", "base64")
            assert got["events"][0]["by"] == "ops" and got["headers"] == {"trace": "t-9"}
            listed = (await h.get("/api/queues/orders.eu/history", params={"header": "trace=t-9"})).json()
            assert [x["id"] for x in listed["messages"]] == [again.id, mid]
            acked = (await h.get("/api/queues/orders.eu/history", params={"state": "acked"})).json()
            assert [x["id"] for x in acked["messages"]] == [again.id]
            assert (await h.get("/api/queues/orders.eu/messages/999")).status_code == 404
            query = (
                '{ messageHistory(queue: "orders.eu", id: MID) { state events { kind attempt detail } } '
                'history(queue: "orders.eu", state: "acked") { id } }'
            ).replace("MID", str(mid))
            data = (await h.post("/graphql", json={"query": query})).json()["data"]
            assert [e["kind"] for e in data["messageHistory"]["events"]][-1] == "dead_lettered"
            assert data["messageHistory"]["events"][-1]["detail"]["reason"] == "max_attempts"
            assert data["history"] == [{"id": again.id}]
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ORDERS}"}, timeout=WAIT) as h:
            # orders consumes orders.*: it may peek at orders.eu, so it may read its history; not orders.us's.
            assert (await h.get(f"/api/queues/orders.eu/messages/{mid}")).status_code == 200
        async with replika.AsyncClient(srv.url, READER) as reader:
            assert (await reader.history("orders.eu", mid))["id"] == mid
            with pytest.raises(replika.Forbidden):
                await reader.history_list("orders.eu.dlq")
