"""Dramatiq on Replika (replika.contrib.dramatiq): real ``dramatiq`` worker processes against ``replika serve``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from replika.contrib.dramatiq import ReplikaBroker
from tests.conftest import ServerProcess
from tests.frameworks import dramatiq_app, scenarios
from tests.frameworks.scenarios import Worker, python, worker_env

pytestmark = pytest.mark.frameworks


class DramatiqDriver:
    name = "dramatiq"

    def worker(self, url: str, queue: str, log: Path, records_file: Path, lease: float = 30.0) -> Worker:
        argv = [python(), "-m", "dramatiq", "tests.frameworks.dramatiq_app", "--processes", "1", "--threads", "4"]
        return Worker([*argv, "--queues", queue], worker_env(url, queue, records_file, lease), log)

    def send(self, url: str, queue: str, task: str, args: list[tuple[object, ...]], delay: float | None = None) -> None:
        actor = getattr(dramatiq_app, task)
        broker = ReplikaBroker(url)
        try:
            for a in args:
                message = actor.message(*a).copy(queue_name=queue)
                broker.enqueue(message, delay=None if delay is None else int(delay * 1000))
        finally:
            broker.close()

    def dead_letter_queue(self, queue: str) -> str:
        return f"{queue}.dlq"


DRIVER = DramatiqDriver()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("dramatiq") / "data").start()
    try:
        yield server.url
    finally:
        server.stop()


def test_500_tasks_each_run_exactly_once(url: str, tmp_path: Path) -> None:
    scenarios.many_exactly_once(DRIVER, url, tmp_path)


def test_a_delay_longer_than_the_lease_waits_in_the_broker_and_runs_once(url: str, tmp_path: Path) -> None:
    scenarios.countdown_beyond_lease(DRIVER, url, tmp_path)


def test_a_task_whose_worker_is_killed_runs_again_on_a_second_worker(url: str, tmp_path: Path) -> None:
    scenarios.kill9_redelivered(DRIVER, url, tmp_path)


def test_a_task_that_keeps_failing_is_dead_lettered_with_its_retry_history(url: str, tmp_path: Path) -> None:
    scenarios.failing_dead_lettered(DRIVER, url, tmp_path)


def test_a_broker_restart_under_load_loses_no_published_task(tmp_path: Path) -> None:
    scenarios.broker_restart_loses_nothing(DRIVER, tmp_path)


def test_join_waits_for_delayed_messages_and_priorities_map(url: str) -> None:
    """No worker: join times out while a delayed message waits; broker_priority orders delivery."""
    from dramatiq.errors import QueueJoinTimeout

    import replika

    queue = f"prio-{uuid.uuid4().hex[:8]}"
    broker = ReplikaBroker(url)
    try:
        broker.enqueue(dramatiq_app.run.message("low").copy(queue_name=queue))
        broker.enqueue(dramatiq_app.run.message("high").copy(queue_name=queue, options={"broker_priority": 7}))
        with replika.Client(url) as client:
            assert [m.headers["dramatiq-actor"] for m in client.peek(queue, max=2)] == ["run", "run"]
            first = client.peek(queue, max=2)
            assert [dramatiq_app.dramatiq.Message.decode(m.payload).args for m in first] == [("high",), ("low",)]
            client.purge(queue)
        broker.enqueue(dramatiq_app.run.message("later").copy(queue_name=queue), delay=60_000)
        with pytest.raises(QueueJoinTimeout):
            broker.join(queue, timeout=300)
        broker.flush(queue)
        broker.join(queue, timeout=5_000)
    finally:
        broker.close()
