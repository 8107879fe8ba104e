"""taskiq on Replika (replika.contrib.taskiq): real ``taskiq worker`` processes against ``replika serve``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from replika.contrib.taskiq import ReplikaBroker
from tests.conftest import ServerProcess
from tests.frameworks import scenarios, taskiq_app
from tests.frameworks.scenarios import Worker, python, worker_env

pytestmark = pytest.mark.frameworks


class TaskiqDriver:
    name = "taskiq"

    def worker(self, url: str, queue: str, log: Path, records_file: Path, lease: float = 30.0) -> Worker:
        argv = [python(), "-m", "taskiq", "worker", "tests.frameworks.taskiq_app:broker", "--workers", "1"]
        return Worker(argv, worker_env(url, queue, records_file, lease), log)

    def send(self, url: str, queue: str, task: str, args: list[tuple[object, ...]], delay: float | None = None) -> None:
        asyncio.run(self._send(url, queue, task, args, delay))

    async def _send(self, url: str, queue: str, task: str, args: list[tuple[object, ...]], delay: float | None) -> None:
        broker = ReplikaBroker(url, queue=queue)
        await broker.startup()
        try:
            kicker = getattr(taskiq_app, task).kicker().with_broker(broker)
            if delay is not None:
                kicker = kicker.with_labels(delay=delay)
            for a in args:
                await kicker.kiq(*a)
        finally:
            await broker.shutdown()

    def dead_letter_queue(self, queue: str) -> str:
        return f"{queue}.dlq"


DRIVER = TaskiqDriver()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("taskiq") / "data").start()
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
