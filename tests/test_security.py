"""Safe defaults, tokens and permissions, TLS, and the limits on what a client controls, through a real server."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import replika
from replika_protocol import ErrorCode
from replika_server.auth import RateLimit, TokenBucket, load_auth
from replika_server.config import Config, ConfigError, check_exposure, is_loopback
from replika_server.node import Node as Server
from tests.conftest import WAIT, ServerProcess, serving
from tests.raw import Raw, expect_error, header, padded_body
from tests.tokens import ADMIN, AUTH, ORDERS, READER, write


# ----------------------------------------------------------------------------------------------- safe defaults
def test_the_default_bind_is_loopback() -> None:
    assert Config().host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_an_exposed_bind_without_authentication_is_refused(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        check_exposure(Config(host=host))
    check_exposure(Config(host=host, insecure=True))  # said on purpose
    check_exposure(Config(host=host, auth=tmp_path / "auth.toml"))
    check_exposure(Config(host=host, tls_cert=Path("c"), tls_key=Path("k"), tls_client_ca=Path("ca")))


def test_the_cli_refuses_an_exposed_bind_and_says_why(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replika_server", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--auth" in result.stderr and "--insecure" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything


# ----------------------------------------------------------------------------------------------- tokens
async def test_a_missing_or_wrong_token_is_unauthorized_and_closed(tmp_path: Path, auth_file: Path) -> None:
    async with serving(tmp_path / "d", auth=auth_file) as srv:
        for token in (None, "not-a-token-at-all-000", ORDERS[:-1]):
            with pytest.raises(replika.Unauthorized):
                async with replika.AsyncClient(srv.url, token=token):
                    pass
        conn = await Raw.connect(srv.port, hello=False)
        conn.send({"op": "hello", "id": 1, "versions": [1], "token": "wrong-token-0123456789"})
        await conn.closed_after_error(ErrorCode.UNAUTHORIZED, 1)
        conn = await Raw.connect(srv.port, hello=False)
        conn.send({"op": "hello", "id": 2, "versions": [1], "token": 12345})
        await conn.closed_after_error(ErrorCode.UNAUTHORIZED, 2)


async def test_permissions_follow_the_patterns(tmp_path: Path, auth_file: Path) -> None:
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ADMIN) as admin,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
        replika.AsyncClient(srv.url, token=READER) as reader,
    ):
        await orders.publish("orders", b"a")
        await orders.publish("orders.eu", b"b")
        with pytest.raises(replika.Forbidden, match="publish"):
            await orders.publish("billing", b"c")
        with pytest.raises(replika.Forbidden):
            await orders.publish_many("ordersX", [b"c", b"d"])
        with pytest.raises(replika.Forbidden, match="consume"):
            await orders.fetch("orders")  # may publish to it, not consume from it
        with pytest.raises(replika.Forbidden):
            await reader.publish("orders.eu", b"x")
        [msg] = await reader.fetch("orders.eu", max=10)
        assert msg.payload == b"b"
        await msg.ack()
        assert (await admin.stats("orders.eu"))["total"] == 0
        assert (await admin.stats("orders"))["total"] == 1
        assert "billing" not in [q["queue"] for q in await admin.queues()]  # refused: nothing created


async def test_admin_operations_need_admin(tmp_path: Path, auth_file: Path) -> None:
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ADMIN) as admin,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
    ):
        await orders.publish("orders.eu", b"1")
        await admin.publish("billing", b"2")
        with pytest.raises(replika.Forbidden):
            await orders.declare("orders.eu", max_attempts=3)
        with pytest.raises(replika.Forbidden):
            await orders.purge("orders.eu")
        with pytest.raises(replika.Forbidden):
            await orders.delete_queue("orders.eu")
        with pytest.raises(replika.Forbidden):
            await orders.stats("billing")
        assert (await orders.stats("orders.eu"))["total"] == 1  # refused calls changed nothing
        assert [q["queue"] for q in await orders.queues()] == ["orders.eu"]  # only what it may see
        assert [q["queue"] for q in await admin.queues()] == ["billing", "orders.eu"]
        await admin.declare("orders.eu", max_attempts=3)
        assert await admin.purge("orders.eu") == 1
        await admin.delete_queue("billing")


async def test_settle_needs_consume(tmp_path: Path, auth_file: Path) -> None:
    async with serving(tmp_path / "d", auth=auth_file) as srv:
        async with replika.AsyncClient(srv.url, token=ADMIN) as admin:
            await admin.publish("orders.us", b"x")
            [msg] = await admin.fetch("orders.us")
        conn = await Raw.connect(srv.port, token=READER)
        for op in ("ack", "nack", "reject", "touch"):
            reply = await conn.request({"op": op, "id": 7, "queue": "orders.us", "ids": [msg.id], "tokens": [1]})
            expect_error(reply, 7, ErrorCode.FORBIDDEN)
        async with replika.AsyncClient(srv.url, token=ADMIN) as admin:
            assert (await admin.stats("orders.us"))["total"] == 1
        await conn.close()


def test_auth_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    bad = {
        "": "no tokens",
        "[tokens.a]\nsecret = 'short'\n": "at least 16",
        "[tokens.a]\npublish = ['*']\n": "exactly one",
        "[tokens.a]\nsecret_sha256 = 'abc'\n": "64 hex",
        "[tokens.a]\nsecret = '0123456789abcdef'\nadmin = 'yes'\n": "admin",
        "[tokens.a]\nsecret = '0123456789abcdef'\npublish = 'orders'\n": "list",
        "[tokens.a]\nsecret = '0123456789abcdef'\nsubscribe = []\n": "unknown keys",
        "[tokens.a]\nsecret = '0123456789abcdef'\n[tokens.b]\nsecret = '0123456789abcdef'\n": "same secret",
        "[tokens.a]\nsecret = '0123456789abcdef'\npublish_rate = -1\n": "publish_rate",
        "[tokens.a\n": "not valid TOML",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_auth(path, None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_auth(tmp_path / "missing.toml", None)


def test_the_right_token_is_found_whatever_its_position(auth_file: Path) -> None:
    table = load_auth(auth_file, None)
    assert [table.authenticate(s).name for s in (ADMIN, ORDERS, READER)] == ["ops", "orders", "reader"]  # type: ignore[union-attr]
    assert table.authenticate(ADMIN + "x") is None
    assert table.authenticate(None) is None


async def test_a_reload_applies_new_permissions_without_dropping_connections(tmp_path: Path, auth_file: Path) -> None:
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
        replika.AsyncClient(srv.url, token=READER) as reader,
    ):
        with pytest.raises(replika.Forbidden):
            await orders.publish("billing", b"x")
        new = AUTH.replace('"orders", "orders.*"]', '"orders", "orders.*", "billing"]')
        write(auth_file, new[: new.index("[tokens.reader]")])
        assert srv.server.reload_auth()
        await orders.publish("billing", b"x")  # same connection, new permission
        # The reader's token is gone: its connection was closed, and reconnecting is refused.
        with pytest.raises((replika.ConnectionLost, replika.Unauthorized)):
            await reader.ping()
        with pytest.raises(replika.Unauthorized):
            async with replika.AsyncClient(srv.url, token=READER):
                pass
        # A file that does not load leaves the tokens in force as they were.
        write(auth_file, "[tokens.broken\n")
        assert not srv.server.reload_auth()
        await orders.publish("billing", b"y")


def test_sighup_reloads_the_auth_file(tmp_path: Path, auth_file: Path) -> None:
    proc = ServerProcess(tmp_path / "d", "--auth", str(auth_file)).start()
    try:
        with replika.Client(proc.url, token=ORDERS) as orders:
            with pytest.raises(replika.Forbidden):
                orders.publish("billing", b"x")
            auth_file.write_text(AUTH.replace('"orders", "orders.*"', '"orders", "orders.*", "billing"'))
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + WAIT
            while "auth_reloaded" not in proc.log.read_text():
                assert time.monotonic() < deadline, "the server did not reload its auth file"
                time.sleep(0.01)  # another process writes the log: there is nothing to await
            orders.publish("billing", b"x")  # the connection survived and has the new permission
    finally:
        proc.stop()


# ----------------------------------------------------------------------------------------------- rate limits
def test_token_bucket_admits_the_rate_and_says_when_to_retry() -> None:
    bucket = TokenBucket(RateLimit(rate=100.0, burst=10.0))
    now = 1000.0
    bucket._stamp = now
    assert bucket.take(10, now) == 0.0
    assert bucket.take(1, now) == pytest.approx(0.01)
    assert bucket.take(5, now + 0.05) == 0.0  # 5 came back in 50 ms
    assert bucket.take(50, now + 0.05) == pytest.approx(0.1)  # a batch above the burst waits for a full bucket
    assert bucket.take(50, now + 0.15) == 0.0  # ... and then goes, paid for afterwards
    assert bucket.take(1, now + 0.15) == pytest.approx(0.41)


async def test_publish_rate_limit_refuses_with_retry_after(tmp_path: Path, auth_file: Path) -> None:
    write(
        auth_file, AUTH.replace('consume = ["orders.*"]', 'consume = ["orders.*"]\npublish_rate = 1\npublish_burst = 5')
    )
    async with (
        serving(tmp_path / "d", auth=auth_file) as srv,
        replika.AsyncClient(srv.url, token=ORDERS) as orders,
        replika.AsyncClient(srv.url, token=ADMIN) as admin,
    ):
        await orders.publish_many("orders", [b"x"] * 5)
        with pytest.raises(replika.RateLimited) as caught:
            await orders.publish("orders", b"y")
        assert 0 < caught.value.retry_after <= 1.0
        assert caught.value.retriable
        await admin.publish("orders", b"z")  # another token has its own bucket (here: none)
        assert (await admin.stats("orders"))["total"] == 6  # the refused publish stored nothing


async def test_publish_rate_applies_to_everybody_without_auth(tmp_path: Path) -> None:
    async with (
        serving(tmp_path / "d", publish_rate=1.0, publish_burst=2) as srv,
        replika.AsyncClient(srv.url) as a,
        replika.AsyncClient(srv.url) as b,
    ):
        await a.publish("q", b"1")
        await b.publish("q", b"2")
        with pytest.raises(replika.RateLimited):
            await a.publish("q", b"3")


# ----------------------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> Iterator[dict[str, Path]]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {"cert": tmp_path / "server.pem", "key": tmp_path / "server.key", "ca": tmp_path / "ca.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(files["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    yield files


def client_context(ca: trustme.CA, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client_cert:
        ca.issue_cert("client@example.com").configure_cert(ctx)
    return ctx


async def test_tls_round_trip(tmp_path: Path, tls_files: dict[str, Path], ca: trustme.CA) -> None:
    async with serving(tmp_path / "d", tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as srv:
        url = f"replikas://localhost:{srv.port}"
        async with replika.AsyncClient(url, ssl=client_context(ca)) as client:
            await client.publish("q", b"over tls")
            [msg] = await client.fetch("q")
            assert msg.payload == b"over tls"
            await msg.ack()
        with pytest.raises(replika.ConnectionLost):  # the system CAs do not know our test CA
            async with replika.AsyncClient(url, connect_timeout=WAIT):
                pass
        with pytest.raises(replika.ReplikaError):  # plain TCP to a TLS port gets nowhere
            async with replika.AsyncClient(f"replika://127.0.0.1:{srv.port}", connect_timeout=2.0):
                pass


def test_tls_with_the_blocking_client(tmp_path: Path, tls_files: dict[str, Path], ca: trustme.CA) -> None:
    args = ("--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"]))
    proc = ServerProcess(tmp_path / "d", *args).start()
    try:
        with replika.Client(f"replikas://localhost:{proc.port}", ssl=client_context(ca)) as client:
            client.publish("q", b"blocking tls")
            [msg] = client.fetch("q")
            assert msg.payload == b"blocking tls"
    finally:
        proc.stop()


async def test_mutual_tls_requires_a_client_certificate(
    tmp_path: Path, tls_files: dict[str, Path], ca: trustme.CA
) -> None:
    config = {"tls_cert": tls_files["cert"], "tls_key": tls_files["key"], "tls_client_ca": tls_files["ca"]}
    async with serving(tmp_path / "d", **config) as srv:
        url = f"replikas://localhost:{srv.port}"
        async with replika.AsyncClient(url, ssl=client_context(ca, client_cert=True)) as client:
            await client.ping()
        with pytest.raises(replika.ConnectionLost):
            async with replika.AsyncClient(url, ssl=client_context(ca), connect_timeout=WAIT) as client:
                await client.ping()  # TLS 1.3 may report the refused certificate only at the first read


def test_bad_tls_settings_are_refused(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="together"):
        Config(tls_cert=tls_files["cert"])
    with pytest.raises(ConfigError, match="tls_client_ca needs"):
        Config(tls_client_ca=tls_files["ca"])

    async def start() -> None:
        await Server.start(Config(port=0, data_dir=tmp_path / "d", tls_cert=tls_files["key"], tls_key=tls_files["key"]))

    with pytest.raises(ConfigError, match="TLS"):
        asyncio.run(start())


# ----------------------------------------------------------------------------------------------- limits
async def test_connections_beyond_the_limit_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", max_connections=2) as srv:
        async with replika.AsyncClient(srv.url) as a, replika.AsyncClient(srv.url):
            with pytest.raises(replika.ConnectionRefusedByServer) as caught:
                async with replika.AsyncClient(srv.url):
                    pass
            assert caught.value.code == "TOO_MANY_CONNECTIONS" and caught.value.retriable
            await a.ping()  # the connections inside the limit are untouched
        async with replika.AsyncClient(srv.url) as c:  # room again once they closed
            await c.ping()


async def test_a_connection_that_never_says_hello_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", handshake_timeout=0.2) as srv:
        conn = await Raw.connect(srv.port, hello=False)
        await conn.closed_after_error(ErrorCode.HANDSHAKE_TIMEOUT)
        half = await Raw.connect(srv.port, hello=False)
        half.send(header(100) + b"\x82")  # a hello that never finishes arriving
        await half.closed_after_error(ErrorCode.HANDSHAKE_TIMEOUT)


async def test_frames_before_the_handshake_are_small(tmp_path: Path) -> None:
    async with serving(tmp_path / "d") as srv:
        conn = await Raw.connect(srv.port, hello=False)
        conn.send(header(1024 * 1024))
        await conn.closed_after_error(ErrorCode.FRAME_TOO_LARGE)
        async with replika.AsyncClient(srv.url) as client:  # after it, the configured max_frame applies
            await client.publish("q", b"x" * (1024 * 1024))


async def test_the_small_limit_ends_with_a_successful_hello_even_within_one_read(
    tmp_path: Path, auth_file: Path
) -> None:
    # SPEC §2: frames are decoded one at a time until the hello succeeds; a frame right behind it, in the same
    # write, is then held to max_frame: the peer has authenticated by the time its prefix is checked.
    big = padded_body({"op": "publish", "id": 2, "queue": "q", "payloads": [b""]}, 70_000)
    hello = {"op": "hello", "id": 1, "versions": [1], "client": "t", "token": ADMIN}
    async with serving(tmp_path / "d", auth=auth_file) as srv:
        conn = await Raw.connect(srv.port, hello=False)
        conn.send(hello, header(len(big)) + big)
        assert (await conn.reply())["ok"] is True
        assert (await conn.reply())["ok"] is True
        await conn.close()
        # A hello that fails leaves the limit at 64 KiB for the rest of that read, and closes.
        refused = await Raw.connect(srv.port, hello=False)
        refused.send({**hello, "token": "wrong"}, header(len(big)) + big)
        await refused.closed_after_error(ErrorCode.UNAUTHORIZED, rid=1)
        async with replika.AsyncClient(srv.url, token=ADMIN) as client:
            assert (await client.stats("q"))["total"] == 1  # only the authenticated one


async def test_idle_connections_are_closed_unless_kept_alive(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", idle_timeout=0.3) as srv:
        conn = await Raw.connect(srv.port)
        await conn.closed_after_error(ErrorCode.IDLE_TIMEOUT)
        # A long poll is not idleness: the fetch outlives the idle timeout and is answered.
        poller = await Raw.connect(srv.port)
        reply = await poller.request({"op": "fetch", "id": 5, "queue": "q", "wait": 0.9})
        assert reply == {"id": 5, "ok": True, "msgs": []}
        await poller.ping_ok()
        await poller.close()
        async with replika.AsyncClient(srv.url) as client:
            await asyncio.sleep(1.0)  # three idle timeouts of doing nothing: the SDK's pings keep it open
            await client.ping()
            assert client.connected


async def test_max_queues(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", max_queues=2) as srv, replika.AsyncClient(srv.url) as client:
        await client.publish("a", b"1")
        await client.declare("b")
        for call in (client.publish("c", b"1"), client.declare("c"), client.fetch("c")):
            with pytest.raises(replika.TooManyQueues):
                await call
        await client.publish("a", b"2")  # existing queues go on
        assert [q["queue"] for q in await client.queues()] == ["a", "b"]


async def test_queue_length_and_bytes_limits(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", queue_max_length=3) as srv, replika.AsyncClient(srv.url) as client:
        await client.publish_many("q", [b"1", b"2", b"3"])
        with pytest.raises(replika.QueueFull):
            await client.publish("q", b"4")
        [msg] = await client.fetch("q")
        await msg.ack()
        await client.publish("q", b"4")  # room again
        await client.declare("big", max_length=100, max_bytes=10)
        await client.publish("big", b"0123456789")
        with pytest.raises(replika.QueueFull, match="bytes"):
            await client.publish("big", b"x")
        stats = await client.stats("big")
        assert (stats["max_length"], stats["max_bytes"], stats["bytes"]) == (100, 10, 10)


async def test_a_client_that_does_not_read_is_not_buffered_without_bound(tmp_path: Path) -> None:
    limit = 1024 * 1024
    payload = b"p" * (60 * 1024)
    async with serving(tmp_path / "d", max_outbound=limit, max_payload=64 * 1024) as srv:
        async with replika.AsyncClient(srv.url) as client:
            await client.publish_many("q", [payload] * 200)  # 12 MiB
        conn = await Raw.connect(srv.port)
        conn.send(*({"op": "fetch", "id": i, "queue": "q", "max": 10} for i in range(1, 31)))
        # Wait until the server has done all it will while we do not read: every fetch answered or held back.
        [server_conn] = srv.server.connections
        deadline = time.monotonic() + WAIT
        while server_conn._inflight and server_conn.reply_room() > 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # the server's progress on our unread socket is not awaitable from here
        transport = server_conn._transport
        assert transport is not None
        assert transport.get_write_buffer_size() <= limit + len(payload) + 4096
        # Reading again lets every held-back fetch go, and nothing is lost or duplicated on the way.
        got: list[int] = []
        for _ in range(30):
            reply = await conn.reply()
            assert reply["ok"] is True
            got.extend(m[0] for m in reply["msgs"])
        rid = 100
        while len(got) < 200:
            rid += 1
            reply = await conn.request({"op": "fetch", "id": rid, "queue": "q", "max": 50})
            assert reply["msgs"], f"only {len(got)} of 200 messages came"
            got.extend(m[0] for m in reply["msgs"])
        assert sorted(got) == list(range(1, 201))
        await conn.close()


async def test_a_refused_connection_gets_its_error_even_after_sending_a_hello(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", max_connections=1) as srv, replika.AsyncClient(srv.url):
        for _ in range(5):
            conn = await Raw.connect(srv.port, hello=False)
            conn.send({"op": "hello", "id": 1, "versions": [1]})
            [frame] = await conn.until_eof()
            expect_error(frame, None, ErrorCode.TOO_MANY_CONNECTIONS)


async def test_a_large_frame_right_behind_the_hello_is_accepted(tmp_path: Path) -> None:
    async with serving(tmp_path / "d") as srv:
        conn = await Raw.connect(srv.port, hello=False)
        conn.send(
            {"op": "hello", "id": 1, "versions": [1]},
            {"op": "publish", "id": 2, "queue": "q", "payloads": [b"x" * 200_000]},
        )
        assert (await conn.reply())["ok"] is True
        assert (await conn.reply())["count"] == 1
        await conn.close()


async def test_a_flood_of_small_bad_requests_from_a_client_that_does_not_read_stays_bounded(tmp_path: Path) -> None:
    async with serving(tmp_path / "d") as srv:
        conn = await Raw.connect(srv.port)
        [server_conn] = srv.server.connections
        transport = server_conn._transport
        assert transport is not None
        junk = header(1) + b"\x80"  # {}: no id, so each gets an 88-byte BAD_REQUEST and the connection stays
        for _ in range(40):
            conn.writer.write(junk * 65536)  # 320 KiB a write, 12.5 MiB in all, never reading a reply
            await asyncio.wait_for(conn.writer.drain(), WAIT)  # returns while the server keeps reading
            assert transport.get_write_buffer_size() + server_conn._out.size < 1024 * 1024
            if not transport.is_reading():
                break  # the server held back what it read and stopped reading: the flood is contained
        assert not transport.is_reading()
        await conn.close()


async def test_a_closed_connection_that_never_reads_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("replika_server.connection.CLOSE_GRACE", 0.2)
    async with serving(tmp_path / "d", idle_timeout=0.3, max_payload=64 * 1024) as srv:
        async with replika.AsyncClient(srv.url) as client:
            await client.publish_many("q", [b"p" * 60_000] * 200)
        conn = await Raw.connect(srv.port)
        conn.send(*({"op": "fetch", "id": i, "queue": "q", "max": 50} for i in range(1, 5)))  # ~12 MB unread
        [server_conn] = srv.server.connections
        await asyncio.wait_for(server_conn.lost, WAIT)  # idle, closed, and cut off though it never read
        assert not srv.server.connections
        conn.writer.close()


def test_the_blocking_client_keeps_its_connection_across_a_long_poll(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "d", "--idle-timeout", "1").start()
    try:
        with replika.Client(proc.url) as client:
            client.publish("q", b"x")
            [msg] = client.fetch("q")
            sock = client._sock
            assert client.fetch("other", wait=1.0) == []  # as long as the idle timeout, but not idle
            msg.ack()  # the same connection: its lease did not end with a reconnect
            assert client._sock is sock
    finally:
        proc.stop()
