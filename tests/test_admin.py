"""The admin sidecar through a real broker: JSON API, Prometheus metrics, live feed, GraphQL, auth and CORS."""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import replika
from replika_server.admin.seam import BrokerState, BrokerView
from replika_server.config import Config
from replika_server.node import Node as Server
from replika_server.store.lmdb_engine import LmdbStore
from tests.conftest import WAIT, RunningServer, ServerProcess, serving
from tests.tokens import ADMIN, AUTH, READER, write


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with serving(tmp_path / "d", admin_port=0) as srv:
        yield srv


JSON = {"content-type": "application/json"}


def http(srv: RunningServer, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.server.admin_port}", headers=headers, timeout=WAIT)


async def next_sample(srv: RunningServer) -> None:
    assert srv.server.admin is not None
    await asyncio.wait_for(srv.server.admin.sampler.next_sample(), WAIT)


# ----------------------------------------------------------------------------------------------- JSON API
async def test_health_and_info(admin: RunningServer) -> None:
    async with http(admin) as h:
        assert (await h.get("/healthz")).json() == {"status": "ok"}
        assert (await h.get("/readyz")).json() == {"status": "ready"}
        info = (await h.get("/api/info")).json()
        assert info["durability"] == "sync" and info["port"] == admin.port and info["store_bytes"] > 0
        assert isinstance(info["uptime_seconds"], float) and info["version"]


async def test_publish_fetch_and_ack_over_http_meet_the_tcp_protocol(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        assert (await h.post("/api/queues/jobs/publish", content=b"from curl")).json() == {"id": 1}
        batch = {
            "messages": [
                {"payload": "text", "headers": {"k": "v"}},
                {"payload": base64.b64encode(b"\xff\x00").decode(), "encoding": "base64"},
            ]
        }
        assert (await h.post("/api/queues/jobs/publish-batch", json=batch)).json() == {"ids": [2, 3]}
        msgs = await client.fetch("jobs", max=10)
        assert [(m.payload, m.headers) for m in msgs] == [
            (b"from curl", {}),
            (b"text", {"k": "v"}),
            (b"\xff\x00", {}),
        ]
        await client.nack(msgs)
        got = (await h.post("/api/queues/jobs/fetch", params={"max": 10, "lease": 60})).json()["messages"]
        assert [m["id"] for m in got] == [1, 2, 3]
        assert got[2]["encoding"] == "base64" and base64.b64decode(got[2]["payload"]) == b"\xff\x00"
        assert got[0]["payload"] == "from curl" and got[0]["attempts"] == 2
        reply = await h.post("/api/queues/jobs/ack", json={"leases": [[m["id"], m["lease"]] for m in got[:2]]})
        assert reply.json() == {"failed": {}}
        reply = await h.post("/api/queues/jobs/nack", json={"leases": [[3, got[2]["lease"]]], "delay": 60})
        assert reply.json() == {"failed": {}}
        again = await h.post("/api/queues/jobs/ack", json={"leases": [[1, got[0]["lease"]]]})
        assert again.status_code == 409  # nothing was acked: a script checking the status sees it
        assert again.json()["failed"] == {"1": "STALE_LEASE"} and again.json()["code"] == "STALE_LEASE"
        stats = await client.stats("jobs")
        assert (stats["ready"], stats["delayed"], stats["total"]) == (0, 1, 1)


async def test_a_settle_that_settles_nothing_is_a_409_and_one_that_settles_some_lists_the_rest(
    admin: RunningServer,
) -> None:
    async with http(admin) as h:
        await h.post("/api/queues/jobs/publish-batch", json={"messages": [{"payload": str(i)} for i in range(4)]})
        got = (await h.post("/api/queues/jobs/fetch", params={"max": 4})).json()["messages"]
        a, b, c, d = ([m["id"], m["lease"]] for m in got)
        for op, pair in (("ack", a), ("nack", b), ("reject", c)):
            reply = await h.post(f"/api/queues/jobs/{op}", json={"leases": [pair, pair]})  # a repeat is sent once
            assert (reply.status_code, reply.json()) == (200, {"failed": {}}), op
        touched = await h.post("/api/queues/jobs/touch", json={"leases": [d], "lease": 120})
        assert (touched.status_code, touched.json()) == (200, {"failed": {}})
        never = [b[0], d[1] + 1000]  # a token this broker never issued
        for op in ("ack", "nack", "reject", "touch"):
            stale = await h.post(f"/api/queues/jobs/{op}", json={"leases": [a, never]})
            assert stale.status_code == 409, op
            assert stale.json() == {
                "code": "STALE_LEASE",
                "message": "no lease was settled: each lease is stale (see reasons)",
                "failed": {str(a[0]): "STALE_LEASE", str(b[0]): "STALE_LEASE"},
                "reasons": {str(a[0]): "gone", str(b[0]): "unknown"},
            }, op
        # Two tokens for one message: the reply, keyed by id, cannot say whether one of them applied.
        either = await h.post("/api/queues/jobs/touch", json={"leases": [d, [d[0], d[1] + 1000]]})
        assert (either.status_code, either.json()["failed"]) == (200, {str(d[0]): "STALE_LEASE"})
        some = await h.post("/api/queues/jobs/ack", json={"leases": [d, b]})
        assert some.status_code == 200  # d was acked; b had been nacked, so its token is spent
        assert some.json() == {"failed": {str(b[0]): "STALE_LEASE"}, "reasons": {str(b[0]): "settled"}}
        assert (await h.get("/api/queues/jobs")).json()["total"] == 1  # b ready again; a and d acked
        dead = (await h.get("/api/queues/jobs/dead-letters")).json()["messages"]
        assert [m["payload"] for m in dead] == ["2"]  # c, rejected
        spec = (await h.get("/openapi.json")).json()
        for op in ("ack", "nack", "reject", "touch"):
            assert "409" in spec["paths"][f"/api/queues/{{queue}}/{op}"]["post"]["responses"], op


async def test_the_framework_s_refusals_have_the_api_s_shape_and_a_true_allow_header(admin: RunningServer) -> None:
    async with http(admin) as h:
        missing = await h.get("/api/no/such/path")
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
        not_json = await h.post("/api/queues/jobs/ack", content=b"{", headers={"content-type": "application/json"})
        assert not_json.status_code == 422 and not_json.json()["detail"]  # FastAPI's validation, as documented
        for path, allowed in (("/api/queues/jobs", "DELETE, GET"), ("/graphql", "GET, POST")):
            refused = await h.request("PUT", path)
            assert (refused.status_code, refused.headers["allow"]) == (405, allowed), path
        # Text that has no UTF-8 form (JSON can spell a lone surrogate) is refused, not a 500.
        for message in ({"payload": "\ud800"}, {"payload": "x", "headers": {"k": "\ud800"}}):
            body = json.dumps({"messages": [message]})  # "\\ud800": valid JSON, not valid Unicode
            bad = await h.post("/api/queues/jobs/publish-batch", content=body, headers=JSON)
            assert (bad.status_code, bad.json()["code"]) == (400, "BAD_REQUEST"), message
        nothing = await h.post("/api/queues/bad name!/publish-batch", json={"messages": []})
        assert nothing.status_code == 400  # an empty batch still names a queue the broker would take
        graphql = await h.post("/graphql", content=b'"a string"', headers={"content-type": "application/json"})
        assert graphql.status_code == 400


async def test_the_broker_is_what_the_sidecar_s_seam_says(admin: RunningServer) -> None:
    assert isinstance(admin.server, BrokerView) and isinstance(admin.server.broker, BrokerState)


async def test_errors_carry_the_protocol_codes(admin: RunningServer) -> None:
    async with http(admin) as h:
        missing = await h.post("/api/queues/nope/purge")
        assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
        bad = await h.post("/api/queues/bad name!/publish", content=b"x")
        assert bad.status_code == 400 and bad.json()["code"] == "BAD_REQUEST"
        big = await h.post("/api/queues/jobs/publish", content=b"x" * (9 * 1024 * 1024))
        assert big.status_code == 413 and big.json()["code"] == "PAYLOAD_TOO_LARGE"
        assert (await h.post("/api/queues/jobs/ack", json={"leases": []})).status_code == 400
        # A declared 2 GiB body is refused on its header, before any of it is read (raw: httpx would not send it).
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.admin_port)
        writer.write(b"POST /api/queues/jobs/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        writer.write(b"Content-Length: 2147483648\r\n\r\nx")
        status = await asyncio.wait_for(reader.readline(), WAIT)
        assert status.split()[1] == b"413", status
        writer.close()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"x"

        chunked = await h.post("/api/queues/jobs/publish", content=chunks())
        assert chunked.status_code == 400 and "Content-Length" in chunked.json()["message"]


async def test_queue_list_detail_rates_purge_and_delete(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        await client.publish("orders", b"first")
        await next_sample(admin)
        await client.publish_many("orders", [b"x"] * 99)
        await next_sample(admin)
        [row] = (await h.get("/api/queues")).json()["queues"]
        assert (row["queue"], row["ready"], row["dead"], row["consumers"]) == ("orders", 100, 0, 0)
        assert row["rates"]["publish"] > 0 and row["counters"]["published"] == 100
        detail = (await h.get("/api/queues/orders")).json()
        assert detail["total"] == 100 and detail["history"] and detail["history"][-1][1] == 100
        assert (await h.post("/api/queues/orders/purge")).json() == {"purged": 100}
        assert (await h.delete("/api/queues/orders")).json() == {"deleted": "orders"}
        assert (await h.get("/api/queues/orders")).status_code == 404


async def test_a_queue_created_since_the_last_sample_has_the_rows_fields_with_zero_rates(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        await client.publish("old", b"1")
        await next_sample(admin)
        await client.publish("new", b"1")  # unsampled, or sampled once: no earlier sample to take a rate from
        listed = {r["queue"]: r for r in (await h.get("/api/queues")).json()["queues"]}
        detail = (await h.get("/api/queues/new")).json()
        assert set(listed["new"]["rates"]) == set(listed["old"]["rates"]) and set(listed["new"]["rates"])
        for row in (listed["new"], detail):
            assert row["rates"] == dict.fromkeys(listed["old"]["rates"], 0.0)
            assert (row["ready"], row["dead"], row["consumers"]) == (1, 0, 0)
        query = '{ queue(name: "new") { ready dead rates { publish ack } } }'
        got = (await h.post("/graphql", json={"query": query})).json()["data"]["queue"]
        assert got == {"ready": 1, "dead": 0, "rates": {"publish": 0.0, "ack": 0.0}}


async def test_openapi_docs(admin: RunningServer) -> None:
    async with http(admin) as h:
        docs = await h.get("/docs")
        assert docs.status_code == 200 and "openapi.json" in docs.text
        assert "cdn" not in docs.text  # no internet needed: the page's assets come from the broker
        for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
            assert asset in docs.text and (await h.get(asset)).status_code == 200
        spec = (await h.get("/openapi.json")).json()
        for path in ("/api/queues", "/api/queues/{queue}/publish", "/api/queues/{queue}/redrive", "/metrics"):
            assert path in spec["paths"], path


# ----------------------------------------------------------------------------------------------- metrics
async def test_prometheus_metrics(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        await client.publish_many("m", [b"abc"] * 5)
        [msg, *_] = await client.fetch("m", max=2)
        await msg.ack()
        response = await h.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
        assert samples[("replika_messages_published_total", (("queue", "m"),))] == 5
        assert samples[("replika_messages_delivered_total", (("queue", "m"),))] == 2
        assert samples[("replika_messages_acked_total", (("queue", "m"),))] == 1
        assert samples[("replika_queue_messages", (("queue", "m"), ("state", "in_flight")))] == 1
        assert samples[("replika_queue_messages", (("queue", "m"), ("state", "ready")))] == 3
        assert samples[("replika_queue_bytes", (("queue", "m"),))] == 12
        assert samples[("replika_connections", ())] == 1
        assert families["replika_publish_confirm_seconds"].type == "histogram"
        assert samples[("replika_publish_confirm_seconds_count", ())] >= 1
        assert samples[("replika_commit_batch_requests_count", ())] >= 3
        assert samples[("replika_publish_confirm_seconds_bucket", (("le", "+Inf"),))] >= 1


async def test_latency_histograms_measure_a_commit_done_on_the_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop's loop.time() moves in millisecond steps: timed with it, a commit of a fraction of a millisecond
    # measured 0 most of the time, so these histograms put most publishes under 100 us.
    slow = 0.0003
    commit = LmdbStore._commit_sync

    def slow_commit(self: LmdbStore, writes: Any) -> None:
        time.sleep(slow)  # an fsync, blocking the loop thread as the real one does
        commit(self, writes)

    monkeypatch.setattr(LmdbStore, "_commit_sync", slow_commit)
    async with serving(tmp_path / "d") as srv, replika.AsyncClient(srv.url) as client:
        for _ in range(10):
            await client.publish("m", b"x")
        server = srv.server
        for histogram in (server.publish_confirm, server.broker.commit_seconds):
            assert histogram.count >= 10
            below = bisect.bisect_left(histogram.bounds, slow)  # the buckets whose upper bound is under it
            assert sum(histogram.counts[:below]) == 0
            assert histogram.sum >= slow * histogram.count


# ----------------------------------------------------------------------------------------------- live feed
async def test_the_live_feed_sends_history_then_samples(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        await client.publish("live", b"1")
        await next_sample(admin)
        events: list[tuple[str, dict[str, Any]]] = []
        async with h.stream("GET", "/api/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            event = ""
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:])))
                    if event == "sample" and any(
                        q["queue"] == "live" and q["ready"] == 2 for q in events[-1][1]["queues"]
                    ):
                        break
                    if len(events) == 2:
                        await client.publish("live", b"2")  # the feed shows it within a sample or two
        assert events[0][0] == "history" and "live" in events[0][1]["history"]
        assert events[1][0] == "sample"


# ----------------------------------------------------------------------------------------------- GraphQL
async def test_graphql_queries_and_mutations(admin: RunningServer) -> None:
    async with http(admin) as h, replika.AsyncClient(admin.url) as client:
        await client.publish_many("gq", [b"a", b"b"])
        await next_sample(admin)
        query = (
            "{ info { version durability } queues { name ready total deadLetter rates { publish } } "
            'queue(name: "gq") { ready bytes } }'
        )
        data = (await h.post("/graphql", json={"query": query})).json()
        assert "errors" not in data, data
        assert data["data"]["info"]["durability"] == "sync"
        assert data["data"]["queues"] == [
            {
                "name": "gq",
                "ready": 2,
                "total": 2,
                "deadLetter": "gq.dlq",
                "rates": {"publish": data["data"]["queues"][0]["rates"]["publish"]},
            }
        ]
        assert data["data"]["queue"] == {"ready": 2, "bytes": 2}
        purged = (await h.post("/graphql", json={"query": 'mutation { purge(queue: "gq") }'})).json()
        assert purged == {"data": {"purge": 2}}
        missing = (await h.post("/graphql", json={"query": '{ queue(name: "nope") { ready } }'})).json()
        assert missing["errors"][0]["extensions"]["code"] == "NOT_FOUND"


# ----------------------------------------------------------------------------------------------- auth, CORS
async def test_with_auth_every_api_call_needs_a_token_with_the_right_permissions(
    tmp_path: Path, auth_file: Path
) -> None:
    async with serving(tmp_path / "d", admin_port=0, auth=auth_file) as srv:
        async with replika.AsyncClient(srv.url, token=ADMIN) as client:
            await client.publish("orders.eu", b"1")
            await client.publish("secret", b"2")
        async with http(srv) as anonymous:
            assert (await anonymous.get("/healthz")).status_code == 200  # probes need no token
            for method, path in (("GET", "/api/queues"), ("GET", "/metrics"), ("POST", "/api/queues/jobs/purge")):
                response = await anonymous.request(method, path)
                assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED", path
            assert (await anonymous.post("/graphql", json={"query": "{ info { version } }"})).status_code == 401
            assert (await anonymous.get("/api/info", params={"token": READER})).status_code == 200  # for EventSource
        async with http(srv, READER) as reader:
            await next_sample(srv)
            [row] = (await reader.get("/api/queues")).json()["queues"]
            assert (row["queue"], row["dead"]) == ("orders.eu", None)  # its dead-letter queue is not the reader's
            assert (await reader.get("/api/queues/orders.eu")).json()["dead"] is None  # nor in the queue's own view
            query = '{ queues { name dead } queue(name: "orders.eu") { dead } }'
            data = (await reader.post("/graphql", json={"query": query})).json()["data"]
            assert data == {"queues": [{"name": "orders.eu", "dead": None}], "queue": {"dead": None}}
            assert (await reader.post("/api/queues/orders.eu/purge")).json()["code"] == "FORBIDDEN"
            assert (await reader.post("/api/queues/orders.eu/publish", content=b"x")).status_code == 403
            assert (await reader.get("/api/queues/secret")).status_code == 403
            assert (await reader.get("/metrics")).status_code == 403
            got = (await reader.post("/api/queues/orders.eu/fetch")).json()["messages"]
            assert [m["payload"] for m in got] == ["1"]
            mutation = (await reader.post("/graphql", json={"query": 'mutation { purge(queue: "orders.eu") }'})).json()
            assert mutation["errors"][0]["extensions"]["code"] == "FORBIDDEN"
        async with http(srv, ADMIN) as ops:
            assert (await ops.post("/api/queues/secret/purge")).json() == {"purged": 1}
            assert (await ops.get("/metrics")).status_code == 200


async def test_other_origins_and_foreign_hosts_are_refused(tmp_path: Path) -> None:
    config: dict[str, Any] = {"admin_port": 0, "admin_cors_origins": ("https://ops.example.com",)}
    async with serving(tmp_path / "d", **config) as srv, http(srv) as h:
        evil = await h.post("/api/queues/jobs/publish", content=b"x", headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and "--admin-cors-origin" in evil.json()["message"]
        own = f"http://127.0.0.1:{srv.server.admin_port}"
        assert (await h.post("/api/queues/jobs/publish", content=b"x", headers={"Origin": own})).status_code == 200
        listed = await h.get("/api/info", headers={"Origin": "https://ops.example.com"})
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "https://ops.example.com"
        rebound = await h.get("/api/info", headers={"Host": f"attacker.example:{srv.server.admin_port}"})
        assert rebound.status_code == 403  # DNS rebinding: a loopback sidecar answers loopback names only


async def test_the_sidecar_can_be_turned_off_and_an_exposed_one_needs_auth(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", admin_port=None) as srv:
        assert srv.server.admin_port is None
    from replika_server.config import Config, ConfigError, check_exposure

    with pytest.raises(ConfigError, match="admin"):
        check_exposure(Config(admin_host="0.0.0.0"))


async def test_bodies_are_not_read_before_the_token_is_checked_and_revoked_feeds_end(
    tmp_path: Path, auth_file: Path
) -> None:
    async with serving(tmp_path / "d", admin_port=0, auth=auth_file) as srv, http(srv) as anonymous:
        refused = await anonymous.post(
            "/api/queues/jobs/ack", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert refused.status_code == 401  # not 422: the body was never parsed
        async with http(srv, READER) as reader, reader.stream("GET", "/api/events") as stream:
            lines = stream.aiter_lines()
            assert await anext(lines) == "event: history"
            write(auth_file, AUTH[: AUTH.index("[tokens.reader]")])
            assert srv.server.reload_auth()
            async for line in lines:
                if line == "event: revoked":
                    break
            else:
                raise AssertionError("the feed of a revoked token went on")


async def test_replika_serve_binds_the_sidecar_at_once_and_serves_it_once_loaded(tmp_path: Path) -> None:
    # `replika serve` loads the web stack after the broker listens (a restart does not wait for FastAPI's import);
    # the port is bound before either port file is written, so a client connecting early waits, never refused.
    proc = ServerProcess(tmp_path / "data").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.admin_port}", timeout=WAIT) as h:
            assert (await h.get("/healthz")).status_code == 200
        async with replika.AsyncClient(proc.url) as c:
            await c.publish("jobs", b"x")
    finally:
        proc.stop()


async def test_a_taken_sidecar_port_fails_the_start(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            async with serving(tmp_path / "d", admin_port=port):
                pass
        with pytest.raises(RuntimeError, match="exited with 1"):
            ServerProcess(tmp_path / "data", "--admin-port", str(port)).start()


async def test_a_sidecar_that_cannot_load_leaves_the_broker_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("no web stack")

    monkeypatch.setattr("replika_server.admin.app.create_app", broken)
    server = await Server.start(
        Config(host="127.0.0.1", port=0, data_dir=tmp_path / "d", admin_port=0), admin_in_background=True
    )
    try:
        admin_port = server.admin_port
        assert server._admin_start is not None
        await asyncio.wait_for(server._admin_start, WAIT)
        assert server.admin is None and server.admin_port is None
        with pytest.raises(OSError):  # closed, not left hanging in a backlog nobody accepts
            await asyncio.open_connection("127.0.0.1", admin_port)
        async with replika.AsyncClient(f"replika://127.0.0.1:{server.port}") as c:
            await c.publish("jobs", b"x")
            assert [m.payload for m in await c.fetch("jobs", wait=0)] == [b"x"]
    finally:
        await server.stop()
