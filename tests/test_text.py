"""The debug text protocol over a real socket: what a person types into nc, with the binary protocol's semantics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import replika
from tests.conftest import WAIT, RunningServer, serving


class Lines:
    """A text-protocol session: send lines, read reply lines, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Lines:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        return cls(reader, writer)

    async def line(self) -> str:
        data = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert data.endswith(b"\r\n"), f"the server closed or sent a partial line: {data!r}"
        return data[:-2].decode()

    async def ask(self, command: str) -> str:
        self.writer.write(command.encode() + b"\r\n")
        return await self.line()

    async def eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def session(server: RunningServer) -> Lines:
    return await Lines.connect(server.port)


async def test_publish_fetch_ack_by_hand(server: RunningServer, session: Lines) -> None:
    assert await session.ask("ping") == "PONG"  # case-insensitive
    assert await session.ask("PUB jobs hello world") == "OK 1"
    assert (await session.ask("PUB jobs")).startswith("ERR BAD_REQUEST usage: PUB <queue> <text>")  # text forgotten
    assert await session.ask("PUB jobs ") == "OK 2"  # an empty message, asked for with the space
    assert await session.ask("FETCH jobs 5") == "OK 2"
    assert await session.line() == "MSG 1:1 attempts=1 bytes=11"
    assert await session.line() == "hello world"
    assert await session.line() == "MSG 2:2 attempts=1 bytes=0"
    assert await session.line() == ""
    assert await session.ask("ACK jobs 1:1") == "OK"
    assert await session.ask("ACK jobs 1:1") == (
        "ERR STALE_LEASE not current: 1:1 is no longer in the queue (already acked, or moved)"
    )
    assert await session.ask("ACK jobs 2:99") == "ERR STALE_LEASE not current: 2:99 was never issued for this message"
    assert await session.ask("NACK jobs 2:2 60") == "OK"
    assert await session.ask("ACK jobs 2:2") == "ERR STALE_LEASE not current: 2:2 was already settled by a NACK"
    stats = await session.ask("STATS jobs")
    assert stats.startswith("OK queue=jobs ready=0 in_flight=0 delayed=1 total=1 ")
    assert await session.ask("QUEUES") == "OK 1"
    assert (await session.line()).startswith("queue=jobs ")
    assert (await session.ask("STATS")).startswith("OK version=")
    assert await session.ask("QUIT") == "OK bye"
    assert await session.eof() == b""
    async with replika.AsyncClient(server.url) as client:  # the same queue the binary protocol sees
        assert (await client.stats("jobs"))["delayed"] == 1


async def test_a_fetch_takes_a_lease_in_seconds(session: Lines) -> None:
    assert await session.ask("PUB short job") == "OK 1"
    assert await session.ask("FETCH short 1 0 0.05") == "OK 1"  # leased for 50 ms
    assert await session.line() == "MSG 1:1 attempts=1 bytes=3"
    assert await session.line() == "job"
    assert await session.ask("FETCH short 1 10") == "OK 1"  # waits for the lease to end: delivered again
    assert await session.line() == "MSG 1:2 attempts=2 bytes=3"
    assert await session.line() == "job"
    assert (await session.ask("FETCH short 1 0 forever")).startswith("ERR BAD_REQUEST lease must be a number")


async def test_errors_use_the_binary_protocols_codes(session: Lines) -> None:
    assert (await session.ask("FLY away")).startswith("ERR UNKNOWN_OP ")
    assert (await session.ask("FETCH bad!name")).startswith("ERR BAD_REQUEST ")
    assert (await session.ask("FETCH q many")).startswith("ERR BAD_REQUEST ")
    assert (await session.ask("ACK q 12")).startswith("ERR BAD_REQUEST ")
    assert (await session.ask("STATS nope")).startswith("ERR NOT_FOUND ")
    assert await session.ask("PING") == "PONG"  # the session goes on after each


async def test_help_lists_every_command(session: Lines) -> None:
    head = await session.ask("HELP")
    lines = [await session.line() for _ in range(int(head.split()[1]))]
    for command in ("PING", "AUTH", "PUB", "FETCH", "ACK", "NACK", "STATS", "QUEUES", "QUIT"):
        assert any(line.startswith(command) for line in lines), command


async def test_a_fetch_can_wait_and_piped_commands_are_answered_in_order(server: RunningServer) -> None:
    session = await Lines.connect(server.port)
    session.writer.write(b"FETCH later 1 30\nPING\n")
    async with replika.AsyncClient(server.url) as client:
        await client.publish("later", b"arrived")
    assert await session.line() == "OK 1"
    assert (await session.line()).startswith("MSG 1:")
    assert await session.line() == "arrived"
    assert await session.line() == "PONG"  # after the fetch, though sent with it
    await session.close()


async def test_end_of_input_answers_everything_then_closes(server: RunningServer) -> None:
    session = await Lines.connect(server.port)
    session.writer.write(b"".join(b"PUB bulk m%d\r\n" % i for i in range(50)))
    session.writer.write_eof()  # as nc -N does
    replies = (await session.eof()).decode().split("\r\n")
    assert replies[:-1] == [f"OK {i}" for i in range(1, 51)] and replies[-1] == ""


async def test_an_http_request_on_the_broker_port_gets_one_http_reply_saying_where_http_is(
    server: RunningServer,
) -> None:
    session = await Lines.connect(server.port)
    session.writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
    reply = (await session.eof()).decode()  # one response, then the broker closes
    head, _, body = reply.partition("\r\n\r\n")
    assert head.splitlines()[0] == "HTTP/1.1 400 Bad Request"
    assert f"Content-Length: {len(body.encode())}" in head.splitlines()
    assert "admin port (8333" in body and "ERR" not in reply
    async with replika.AsyncClient(server.url) as client:  # the broker is fine
        await client.ping()


async def test_a_command_that_only_looks_like_http_later_in_a_session_is_a_command(session: Lines) -> None:
    assert await session.ask("PING") == "PONG"
    assert (await session.ask("GET / HTTP/1.1")).startswith("ERR UNKNOWN_OP")


async def test_with_auth_the_session_logs_in_and_keeps_its_permissions(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text('[tokens.w]\nsecret = "writer-secret-0123456"\npublish = ["logs.*"]\n')
    async with serving(tmp_path / "d", auth=auth) as srv:
        session = await Lines.connect(srv.port)
        assert await session.ask("PING") == "PONG"
        assert (await session.ask("PUB logs.app hi")).startswith("ERR UNAUTHORIZED ")
        assert await session.ask("AUTH writer-secret-0123456") == "OK authenticated as w"
        assert await session.ask("PUB logs.app hi") == "OK 1"
        assert (await session.ask("PUB other hi")).startswith("ERR FORBIDDEN ")
        assert (await session.ask("FETCH logs.app")).startswith("ERR FORBIDDEN ")
        wrong = await Lines.connect(srv.port)
        assert (await wrong.ask("AUTH not-a-real-token-000")).startswith("ERR UNAUTHORIZED ")
        assert await wrong.eof() == b""  # a wrong token closes, as in the binary handshake
        long = await Lines.connect(srv.port)
        long.writer.write(b"AUTH " + b"x" * 5000)
        assert (await long.line()).startswith("ERR FRAME_TOO_LARGE ")
        await session.close()


async def test_the_text_protocol_can_be_turned_off(tmp_path: Path) -> None:
    async with serving(tmp_path / "d", text_protocol=False) as srv:
        session = await Lines.connect(srv.port)
        session.writer.write(b"PING\r\n")
        data = await session.eof()  # taken as a binary frame of a huge length: refused, closed
        assert b"FRAME_TOO_LARGE" in data


async def test_a_flood_of_lines_from_a_client_that_does_not_read_stays_bounded(server: RunningServer) -> None:
    session = await Lines.connect(server.port)
    session.writer.write(b"PING\n")
    assert await session.line() == "PONG"
    [conn] = server.server.connections
    for _ in range(40):
        session.writer.write(b"HELP\n" * 50_000)  # about 1 KiB of reply per 5 bytes sent, never read
        await asyncio.wait_for(session.writer.drain(), WAIT)
        transport = conn._transport
        assert transport is not None
        assert transport.get_write_buffer_size() + conn._out.size < 1024 * 1024
        if not transport.is_reading():
            break
    assert not transport.is_reading()  # held back until the client reads
    await session.close()


async def test_timeouts_are_said_in_a_line(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text('[tokens.w]\nsecret = "writer-secret-0123456"\npublish = ["*"]\n')
    async with serving(tmp_path / "d", auth=auth, handshake_timeout=0.3, idle_timeout=0.5) as srv:
        session = await Lines.connect(srv.port)
        assert await session.ask("PING") == "PONG"  # typing is not logging in
        assert (await session.line()).startswith("ERR HANDSHAKE_TIMEOUT ")
        assert await session.eof() == b""
        session = await Lines.connect(srv.port)
        big = b"x" * 300_000
        session.writer.write(b"AUTH writer-secret-0123456\nPUB q " + big + b"\n")  # the limit rises with AUTH
        assert (await session.line()).startswith("OK authenticated")
        assert await session.line() == "OK 1"
        assert (await session.line()).startswith("ERR IDLE_TIMEOUT ")
