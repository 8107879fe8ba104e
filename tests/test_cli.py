"""The ``replika`` client commands against a real broker, run as a script runs them: a child process whose
standard output, standard error and exit code are what is checked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import replika
from replika_server.cli import build_parser
from tests.conftest import WAIT, ServerProcess

COMMANDS = ("publish", "consume", "peek", "queues", "stats", "purge", "delete", "redrive", "trace", "history")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One broker for the module; each test uses queues of its own."""
    proc = ServerProcess(tmp_path_factory.mktemp("cli") / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


def cli(
    *args: str, url: str | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``replika ARGS`` in a child process, with REPLIKA_URL set to ``url`` and no token unless ``env`` says."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    if url is not None:
        environ["REPLIKA_URL"] = url
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "replika_server", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=WAIT,
        env=environ,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    """The standard output of a command that must have succeeded quietly."""
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    return result.stdout.decode()


def drain(client: replika.Client, queue: str) -> list[replika.SyncMessage]:
    msgs = client.fetch(queue, max=1000, wait=0)
    client.ack(msgs)
    return msgs


# ------------------------------------------------------------------------------------------------ publish
def test_publish_an_argument_prints_its_id(broker: ServerProcess) -> None:
    assert ok(cli("publish", "p1", "hello", "-H", "kind=greeting", url=broker.url)) == "1\n"
    assert ok(cli("publish", "p1", "world", url=broker.url)) == "2\n"
    with replika.Client(broker.url) as client:
        msgs = drain(client, "p1")
    assert [(m.payload, m.headers) for m in msgs] == [(b"hello", {"kind": "greeting"}), (b"world", {})]


def test_publish_reads_one_message_per_line_of_stdin(broker: ServerProcess) -> None:
    out = ok(cli("publish", "p2", "-H", "a=b", stdin=b"first\nsecond\r\n\nlast without newline", url=broker.url))
    assert out == "1\n2\n3\n4\n"
    with replika.Client(broker.url) as client:
        msgs = drain(client, "p2")
    assert [m.payload for m in msgs] == [b"first", b"second", b"", b"last without newline"]
    assert all(m.headers == {"a": "b"} for m in msgs)


def test_publish_a_large_pipe_in_order(broker: ServerProcess) -> None:
    lines = b"".join(b"line %d\n" % i for i in range(20_000))
    out = ok(cli("publish", "p3", "-", stdin=lines, url=broker.url))
    assert out.split() == [str(i) for i in range(1, 20_001)]
    with replika.Client(broker.url) as client:
        assert client.stats("p3")["total"] == 20_000
        assert client.fetch("p3", max=1)[0].payload == b"line 0"


# ------------------------------------------------------------------------------------------------ consume
def test_consume_prints_payloads_and_acks(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("c1", [b"one", b"two", b"three"])
        assert ok(cli("consume", "c1", "--count", "2", url=broker.url)) == "one\ntwo\n"
        stats = client.stats("c1")
        assert (stats["total"], stats["ready"], stats["counters"]["acked"]) == (1, 1, 2)


def test_consume_json_lines(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish("c2", "héllo", headers={"trace": "t-1"})
        client.publish("c2", b"\xff\x00binary")
    lines = ok(cli("consume", "c2", "--json", "--wait", "0", url=broker.url)).splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["id"] == 1 and first["attempts"] == 1 and first["headers"] == {"trace": "t-1"}
    assert (first["payload"], first["encoding"]) == ("héllo", "utf-8")
    assert abs(first["published_at"] - time.time()) < WAIT
    assert (second["payload"], second["encoding"]) == ("/wBiaW5hcnk=", "base64")


def test_consume_no_ack_leaves_the_messages(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("c3", [b"a", b"b"])
        assert ok(cli("consume", "c3", "--count", "2", "--no-ack", url=broker.url)) == "a\nb\n"
        # Released when the command's connection closed: delivered again, as a second attempt.
        msgs = client.fetch("c3", max=10, wait=WAIT)
        assert [(m.payload, m.attempts) for m in msgs] == [(b"a", 2), (b"b", 2)]


def test_consume_wait_stops_when_nothing_arrives(broker: ServerProcess) -> None:
    started = time.monotonic()
    assert ok(cli("consume", "c4-empty", "--wait", "0.5", url=broker.url)) == ""
    assert time.monotonic() - started < WAIT


def test_consume_waits_for_a_message_to_arrive(broker: ServerProcess) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLIKA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "replika_server", "consume", "c5", "--count", "1", "--url", broker.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
    )
    try:
        with replika.Client(broker.url) as client:
            # The consumer's first fetch creates the queue; it is then parked in its long poll.
            deadline = time.monotonic() + WAIT
            while not _exists(client, "c5"):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the consumer never fetched"
                time.sleep(0.02)  # polling another process's progress: there is nothing to await
            client.publish("c5", b"late")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0, err.decode()
    assert out == b"late\n"


def _exists(client: replika.Client, queue: str) -> bool:
    return any(q["queue"] == queue for q in client.queues())


def test_consume_into_a_closed_pipe_exits_141_quietly(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("c6", [b"m%d" % i for i in range(5000)])
    script = f'set -o pipefail; "{sys.executable}" -m replika_server consume c6 --wait 5 | head -n 1'
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, timeout=WAIT, env=dict(os.environ, REPLIKA_URL=broker.url)
    )
    # The whole result on failure: this failed once in a full run (empty stdout) and never again alone.
    assert (result.stdout, result.returncode) == (b"m0\n", 141), result
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr, result


# ------------------------------------------------------------------------------------------------ peek, redrive
def test_peek_shows_without_delivering(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("k1", [b"x", b"y", b"z"])
        assert ok(cli("peek", "k1", "--max", "2", url=broker.url)) == "x\ny\n"
        lines = ok(cli("peek", "k1", "--json", url=broker.url)).splitlines()
        assert [json.loads(line)["payload"] for line in lines] == ["x", "y", "z"]
        assert json.loads(lines[0])["id"] == 1
        stats = client.stats("k1")
        assert (stats["ready"], stats["counters"]["delivered"]) == (3, 0)


def test_redrive_moves_dead_letters_back(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("r1", [b"a", b"b", b"c"])
        client.reject(client.fetch("r1", max=3))
        assert client.stats("r1.dlq")["total"] == 3
        assert ok(cli("redrive", "r1.dlq", "--max", "1", url=broker.url)) == "1\n"
        assert ok(cli("redrive", "r1.dlq", "--to", "r1-elsewhere", url=broker.url)) == "2\n"
        assert [m.payload for m in drain(client, "r1")] == [b"a"]
        assert sorted(m.payload for m in drain(client, "r1-elsewhere")) == [b"b", b"c"]
        assert client.stats("r1.dlq")["total"] == 0


class AgreedAdminSdk:
    """``peek`` and ``redrive`` with exactly the signatures agreed for the SDK (keyword-only here, so that the
    commands must pass them by name), recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def peek(self, queue: str, *, max: int = 20) -> list[SimpleNamespace]:
        self.calls.append(("peek", queue, max))
        return [SimpleNamespace(id=7, attempts=0, published_at=1.5, payload=b"\xffp", headers={"h": "v"})]

    def redrive(self, dlq: str, *, to: str | None = None, max: int | None = None) -> int:
        self.calls.append(("redrive", dlq, to, max))
        return 3


def test_peek_and_redrive_use_the_agreed_sdk_signatures() -> None:
    sdk = AgreedAdminSdk()
    for argv, printed in [
        (["peek", "q", "--max", "5"], b"\xffp\n"),
        (
            ["peek", "q", "--json"],
            b'{"id": 7, "attempts": 0, "published_at": 1.5, "headers": {"h": "v"}, '
            b'"payload": "/3A=", "encoding": "base64"}\n',
        ),
        (["redrive", "q.dlq"], b"3\n"),
        (["redrive", "q.dlq", "--to", "other", "--max", "2"], b"3\n"),
    ]:
        args = build_parser().parse_args(argv)
        out = io.BytesIO()
        args.client_command(sdk, args, out)
        assert out.getvalue() == printed
    assert sdk.calls == [
        ("peek", "q", 5),
        ("peek", "q", 10),
        ("redrive", "q.dlq", None, None),
        ("redrive", "q.dlq", "other", 2),
    ]


# ------------------------------------------------------------------------------------------------ queues, stats
def test_queues_is_an_aligned_table(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("q-table-a", [b"1234"] * 3)
        client.publish("q-table-long-name", b"x")
    lines = ok(cli("queues", url=broker.url)).splitlines()
    assert lines[0].split() == ["QUEUE", "READY", "IN_FLIGHT", "DELAYED", "TOTAL", "BYTES", "DEAD_LETTER"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["q-table-a"].split()[1:] == ["3", "0", "0", "3", "12", "q-table-a.dlq"]
    # Columns line up: each count ends where its heading ends.
    ready_end = lines[0].index("READY") + len("READY")
    assert rows["q-table-a"][:ready_end].endswith(" 3") and rows["q-table-long-name"][:ready_end].endswith(" 1")
    as_json = json.loads(ok(cli("queues", "--json", url=broker.url)))
    assert {"queue": "q-table-a", "ready": 3}.items() <= next(q for q in as_json if q["queue"] == "q-table-a").items()


def test_stats_key_value_lines_and_json(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.declare("s1", max_attempts=4)
        client.publish_many("s1", [b"a", b"b"])
    lines = dict(line.split(": ", 1) for line in ok(cli("stats", "s1", url=broker.url)).splitlines())
    assert (lines["queue"], lines["ready"], lines["total"], lines["max_attempts"]) == ("s1", "2", "2", "4")
    assert (lines["max_length"], lines["counters.published"]) == ("-", "2")
    stats = json.loads(ok(cli("stats", "s1", "--json", url=broker.url)))
    assert (stats["ready"], stats["dead_letter"], stats["max_length"]) == (2, "s1.dlq", None)


# ------------------------------------------------------------------------------------------------ declare
def test_declare_sets_the_options_and_history_of_a_queue(broker: ServerProcess) -> None:
    options = ["--max-attempts", "3", "--dead-letter", "declared.failed", "--max-bytes", "1M", "--overflow"]
    options += ["drop_oldest", "--retry-delay", "250ms", "--retry-backoff", "3", "--retry-max-delay", "1h"]
    options += ["--message-ttl", "12h", "--expired", "drop", "--dedup-window", "0", "--max-length", "9"]
    history = ["--history-retention", "12h", "--history-max", "50", "--history-payloads"]
    assert ok(cli("declare", "declared", *options, *history, url=broker.url)) == ""
    with replika.Client(broker.url) as client:
        stats = client.stats("declared")
        assert (stats["max_attempts"], stats["dead_letter"], stats["max_bytes"]) == (3, "declared.failed", 1024**2)
        assert (stats["overflow"], stats["retry_delay"], stats["retry_backoff"]) == ("drop_oldest", 0.25, 3.0)
        assert (stats["retry_max_delay"], stats["message_ttl"], stats["expired"]) == (3600.0, 43200.0, "drop")
        assert (stats["dedup_window"], stats["max_length"]) == (0.0, 9)
        assert stats["history"] == {"retention": 43200.0, "max_messages": 50, "payloads": True}
        mid = client.publish("declared", b"kept")
        assert client.history("declared", mid)["payload"] == b"kept"
        # Options are replaced as a whole: --history alone is history with its defaults, and nothing else.
        assert ok(cli("declare", "declared", "--history", url=broker.url)) == ""
        stats = client.stats("declared")
        assert stats["history"] == {"retention": 7 * 86400.0, "max_messages": 100_000, "payloads": False}
        assert (stats["max_attempts"], stats["dead_letter"]) == (None, "declared.dlq")
        assert ok(cli("declare", "declared", url=broker.url)) == ""
        assert client.stats("declared")["history"] is None
    bad = cli("declare", "declared", "--history-retention", "soon", url=broker.url)
    assert bad.returncode == 2 and b"not a duration" in bad.stderr
    refused = cli("declare", "declared", "--history-retention", "100d", url=broker.url)  # past the store's 90 days
    assert refused.returncode == 1 and refused.stderr.startswith(b"replika: BAD_REQUEST: ")
    assert b"retention" in refused.stderr


# ------------------------------------------------------------------------------------------------ purge, delete
def test_purge_prints_how_many(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish_many("u1", [b"a", b"b", b"c"])
        held = client.fetch("u1", max=1)  # leased: purge leaves it
        assert ok(cli("purge", "u1", url=broker.url)) == "2\n"
        assert client.stats("u1")["total"] == 1
        client.ack(held)


def test_delete_removes_the_queue(broker: ServerProcess) -> None:
    with replika.Client(broker.url) as client:
        client.publish("d1", b"a")
    assert ok(cli("delete", "d1", url=broker.url)) == ""
    result = cli("stats", "d1", url=broker.url)
    assert result.returncode == 1 and result.stderr.startswith(b"replika: NOT_FOUND: ")


# ------------------------------------------------------------------------------------------------ contract
def test_a_broker_error_exits_1_with_its_code_on_stderr(broker: ServerProcess) -> None:
    for args in (("stats", "nope"), ("purge", "nope"), ("delete", "nope")):
        result = cli(*args, url=broker.url)
        assert result.returncode == 1
        assert result.stdout == b""
        assert result.stderr == b"replika: NOT_FOUND: queue 'nope' does not exist\n"
    result = cli("publish", "bad name", "x", url=broker.url)
    assert result.returncode == 1 and result.stderr.startswith(b"replika: BAD_REQUEST: ")


def test_an_unreachable_broker_exits_1(tmp_path: Path) -> None:
    result = cli("queues", "--url", "replika://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith(b"replika: CONNECTION_LOST: ")


@pytest.mark.parametrize(
    "args",
    [
        ("publish",),  # no queue
        ("consume", "q", "--count", "0"),
        ("consume", "q", "--wait", "soon"),
        ("peek", "q", "--max", "-1"),
        ("publish", "q", "x", "-H", "no-equals-sign"),
        ("queues", "--frobnicate"),
        ("queues", "--url", "http://127.0.0.1:8777"),
        ("frobnicate",),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = cli(*args, url="replika://127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr


@pytest.mark.parametrize("command", (*COMMANDS, "serve", "backup"))
def test_help_everywhere(command: str) -> None:
    out = ok(cli(command, "--help"))
    assert out.startswith(f"usage: replika {command}")
    assert "exit codes:" in out
    if command in COMMANDS:
        assert "--url" in out and "--token" in out


def test_url_and_token_from_the_environment(tmp_path: Path) -> None:
    secret = "cli-secret-0123456789"
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[tokens.ops]\nsecret = "{secret}"\npublish = ["*"]\nconsume = ["*"]\nadmin = true\n')
    proc = ServerProcess(tmp_path / "data", "--auth", str(auth)).start()
    try:
        assert ok(cli("publish", "t1", "x", env={"REPLIKA_URL": proc.url, "REPLIKA_TOKEN": secret})) == "1\n"
        assert ok(cli("publish", "t1", "y", "--url", proc.url, "--token", secret)) == "2\n"
        # A flag wins over the environment.
        result = cli(
            "queues", "--token", "wrong-secret-0123456789", env={"REPLIKA_URL": proc.url, "REPLIKA_TOKEN": secret}
        )
        assert result.returncode == 1 and result.stderr.startswith(b"replika: UNAUTHORIZED: ")
        result = cli("queues", url=proc.url)
        assert result.returncode == 1 and result.stderr.startswith(b"replika: UNAUTHORIZED: ")
        result = cli("queues", "--url", "replika://127.0.0.1:1", env={"REPLIKA_URL": proc.url, "REPLIKA_TOKEN": secret})
        assert result.returncode == 1 and b"CONNECTION_LOST" in result.stderr
    finally:
        proc.stop()
