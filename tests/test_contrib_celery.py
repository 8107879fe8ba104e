"""Celery on Replika (replika.contrib.kombu): real ``celery worker`` processes against ``replika serve``, and the
kombu transport's mapping of AMQP onto Replika without a worker."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import trustme

import replika
from bench import w8
from replika.contrib import _names
from tests import tokens
from tests.conftest import WAIT, ServerProcess
from tests.frameworks import celery_app, scenarios
from tests.frameworks.scenarios import ROOT, Worker, python, worker_env

pytestmark = pytest.mark.frameworks

# Publishing through a broker restart: kombu retries a publish lost with the connection this often.
RETRY = {"max_retries": 200, "interval_start": 0.05, "interval_step": 0.05, "interval_max": 0.5}


class CeleryDriver:
    name = "celery"

    def worker(
        self, url: str, queue: str, log: Path, records_file: Path, lease: float = 30.0, node: str | None = None
    ) -> Worker:
        argv = [python(), "-m", "celery", "-A", "tests.frameworks.celery_app", "worker", "-Q", queue, "-c", "2"]
        argv += ["-P", "prefork", "-n", node or f"{queue}-{uuid.uuid4().hex[:8]}@%h", "--loglevel", "INFO"]
        return Worker(argv, worker_env(url, queue, records_file, lease), log)

    def send(self, url: str, queue: str, task: str, args: list[tuple[object, ...]], delay: float | None = None) -> None:
        with kombu.Connection(url) as conn:
            for a in args:
                celery_app.app.send_task(
                    f"tests.frameworks.celery_app.{task}",
                    args=a,
                    queue=queue,
                    countdown=delay,
                    connection=conn,
                    retry=True,
                    retry_policy=RETRY,
                )

    def dead_letter_queue(self, queue: str) -> str:
        return f"{queue}.dlq"


DRIVER = CeleryDriver()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("celery") / "data").start()
    try:
        yield server.url
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------- with workers
def test_500_tasks_each_run_exactly_once(url: str, tmp_path: Path) -> None:
    scenarios.many_exactly_once(DRIVER, url, tmp_path)


def test_a_countdown_longer_than_the_lease_waits_in_the_broker_and_runs_once(url: str, tmp_path: Path) -> None:
    scenarios.countdown_beyond_lease(DRIVER, url, tmp_path)


def test_an_acks_late_task_whose_worker_is_killed_runs_again_on_a_second_worker(url: str, tmp_path: Path) -> None:
    """The same check bench W8 runs against Redis and RabbitMQ (bench/w8.py)."""
    transport = w8.Transport("replika", url, {}, "test", lambda: None)
    outcome = w8.kill9_check(transport, tmp_path, wait=WAIT)
    assert outcome.redelivered, outcome
    assert outcome.starts == 2


def test_a_task_that_keeps_failing_is_dead_lettered_with_its_retry_history(url: str, tmp_path: Path) -> None:
    """``autoretry_for`` retries with ``self.retry(countdown=...)``; the last failure is rejected to the DLQ."""
    scenarios.failing_dead_lettered(DRIVER, url, tmp_path)


def test_a_broker_restart_under_load_loses_no_published_task(tmp_path: Path) -> None:
    scenarios.broker_restart_loses_nothing(DRIVER, tmp_path)


def test_remote_control_inspect_ping_gets_the_workers_pong(url: str, tmp_path: Path) -> None:
    """``celery inspect ping`` broadcasts through a fanout exchange (a topic binding) and collects the reply
    from its own reply queue."""
    node = f"control-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    worker = DRIVER.worker(url, "control", tmp_path / "control.log", tmp_path / "control.records", node=node)
    try:
        scenarios.wait_until(lambda: "ready." in worker.log.read_text(errors="replace"), "the worker", worker)
        env = worker_env(url, "control", tmp_path / "control.records", 30.0)
        argv = [python(), "-m", "celery", "-A", "tests.frameworks.celery_app", "inspect", "ping"]
        out = subprocess.run(
            [*argv, "-d", node, "--timeout", str(WAIT)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{node}: OK" in out.stdout and "pong" in out.stdout
    finally:
        worker.stop()


# ----------------------------------------------------------------------------------------------- the transport alone
def _fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_priorities_map_to_replika_and_eta_becomes_a_server_side_delay(url: str) -> None:
    queue = _fresh("prio")
    with kombu.Connection(url) as conn:
        producer = conn.Producer()
        producer.publish({"n": "low"}, routing_key=queue, priority=1)
        producer.publish({"n": "high"}, routing_key=queue, priority=8)
        producer.publish({"n": "later"}, routing_key=queue, headers={"eta": "2999-01-01T00:00:00+00:00"})
    with replika.Client(url) as client:
        ready = client.peek(queue, max=10)
        assert [m.payload for m in ready] == [b'{"n": "high"}', b'{"n": "low"}']
        assert client.stats(queue)["delayed"] == 1  # an ETA beyond 30 days waits in steps, in the broker


def test_exchanges_route_through_topic_bindings(url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    fan = kombu.Exchange(f"fan-{tag}", "fanout")
    top = kombu.Exchange(f"top.{tag}", "topic")
    direct = kombu.Exchange(f"dir-{tag}", "direct")
    queues = {
        "f1": kombu.Queue(f"f1-{tag}", fan),
        "f2": kombu.Queue(f"f2-{tag}", fan),
        "t": kombu.Queue(f"t@{tag}", top, routing_key="order.*.created"),
        "d": kombu.Queue(f"d-{tag}", direct, routing_key="a.*"),
    }
    with kombu.Connection(url) as conn:
        for q in queues.values():
            q(conn.default_channel).declare()
        producer = conn.Producer()
        producer.publish(b"fanned", exchange=fan, routing_key="")
        producer.publish(b"created", exchange=top, routing_key="order.eu.created")
        producer.publish(b"updated", exchange=top, routing_key="order.eu.updated")
        producer.publish(b"star-literal", exchange=direct, routing_key="a.*")
        producer.publish(b"star-no", exchange=direct, routing_key="a.b")
    with replika.Client(url) as client:
        got = {k: [m.payload for m in client.peek(_names.queue_name(q.name), max=10)] for k, q in queues.items()}
    assert got == {"f1": [b"fanned"], "f2": [b"fanned"], "t": [b"created"], "d": [b"star-literal"]}
    assert _names.queue_name(f"t@{tag}") == f"t:40{tag}"


def test_simple_queue_round_trip_reject_and_requeue(url: str) -> None:
    """kombu's SimpleQueue drains the connection itself (no event loop): requeue=True is a nack, ready again;
    requeue=False a reject, to the dead-letter queue."""
    name = _fresh("simple")
    with kombu.Connection(url) as conn:
        q = conn.SimpleQueue(name)
        q.put({"a": 1})
        msg = q.get(timeout=WAIT)
        assert msg.payload == {"a": 1} and not msg.delivery_info["redelivered"]
        msg.requeue()
        again = q.get(timeout=WAIT)
        assert again.payload == {"a": 1} and again.delivery_info["redelivered"]
        again.reject()
        with pytest.raises(q.Empty):
            q.get(timeout=0.2)
        q.close()
    with replika.Client(url) as client:
        [dead] = client.peek(f"{name}.dlq")
    assert dead.headers["replika-dead-letter-reason"] == "rejected"
    assert dead.headers["content-type"] == "application/json"


def test_a_publish_sent_twice_by_kombu_is_stored_once(url: str) -> None:
    """kombu sends a publish whose confirm was lost again with the same properties: it is stored once."""
    queue = _fresh("dedup")
    with kombu.Connection(url) as conn:
        channel = conn.default_channel
        message = channel.prepare_message(b"once", properties={})
        channel.basic_publish(message, "", queue)
        channel.basic_publish(message, "", queue)
    with replika.Client(url) as client:
        assert client.stats(queue)["total"] == 1


def test_queue_arguments_and_transport_queue_options_declare_the_queue(url: str) -> None:
    name, tuned = _fresh("ttl"), _fresh("tuned")
    options = {"queue_options": {tuned: {"max_attempts": 3}}}
    with kombu.Connection(url, transport_options=options) as conn:
        kombu.Queue(name, message_ttl=5.0, max_length=10)(conn.default_channel).declare()
        kombu.Queue(tuned)(conn.default_channel).declare()
    with replika.Client(url) as client:
        stats = client.stats(name)
        assert (stats["message_ttl"], stats["expired"], stats["max_length"]) == (5.0, "drop", 10)
        assert stats["overflow"] == "drop_oldest"
        assert client.stats(tuned)["max_attempts"] == 3


def test_tls_and_a_token_in_the_url(tmp_path: Path, auth_file: Path) -> None:
    """``replikas://:TOKEN@host:port`` with Celery's ``broker_use_ssl`` options: the SDK's TLS and token."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=i > 0)
    ca.cert_pem.write_to_path(str(ca_file))
    args = ("--auth", str(auth_file), "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    server = ServerProcess(tmp_path / "data", *args).start()
    try:
        url = f"replikas://:{tokens.ADMIN}@localhost:{server.port}"
        with kombu.Connection(url, ssl={"ca_certs": str(ca_file)}) as conn:
            q = conn.SimpleQueue("secure")
            q.put({"over": "tls"})
            msg = q.get(timeout=WAIT)
            assert msg.payload == {"over": "tls"}
            msg.ack()
            q.close()
        with (
            pytest.raises(replika.Unauthorized),
            kombu.Connection(f"replikas://:wrong@localhost:{server.port}", ssl={"ca_certs": str(ca_file)}) as conn,
        ):
            conn.connect()
    finally:
        server.stop()


def test_names_escape_what_replika_does_not_allow() -> None:
    assert _names.queue_name("celery") == "celery"
    assert _names.queue_name("celery@host.celery.pidbox") == "celery:40host.celery.pidbox"
    assert _names.topic("celery.pidbox", "") == "celery:2epidbox."
    assert _names.binding_pattern("celery.pidbox", "fanout", "ignored") == "celery:2epidbox.#"
    assert _names.binding_pattern("ev", "topic", "task.*") == "ev.task.*"
    assert _names.binding_pattern("ev", "direct", "task.*") == "ev.task.:2a"
    with pytest.raises(ValueError, match="1-255"):
        _names.queue_name("@" * 100)


def test_import_replika_pulls_in_no_framework() -> None:
    names = "{'celery', 'kombu', 'dramatiq', 'taskiq'}"
    code = f"import sys, replika, replika.contrib; print(sorted({names} & set(sys.modules)))"
    out = subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=WAIT, check=True)
    assert out.stdout.strip() == "[]"
