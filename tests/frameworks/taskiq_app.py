"""The taskiq tasks whose workers tests/test_contrib_taskiq.py runs
(``taskiq worker tests.frameworks.taskiq_app:broker``).

Environment: ``REPLIKA_TEST_BROKER``, ``REPLIKA_TEST_RECORDS`` and ``REPLIKA_TEST_LEASE`` as for celery_app.py, and
``REPLIKA_TEST_QUEUE``, the queue the broker consumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskiq import SmartRetryMiddleware

from replika.contrib.taskiq import ReplikaBroker
from tests.frameworks import records

broker = ReplikaBroker(
    os.environ.get("REPLIKA_TEST_BROKER", "replika://127.0.0.1:8777"),
    queue=os.environ.get("REPLIKA_TEST_QUEUE", "taskiq"),
    lease=float(os.environ.get("REPLIKA_TEST_LEASE", "30")),
).with_middlewares(SmartRetryMiddleware(default_retry_count=3, default_delay=0.2, use_jitter=False))


@broker.task
async def run(key: str) -> None:
    records.write("run", key)


@broker.task(retry_on_error=True, max_retries=3)
async def fail(key: str) -> None:
    records.write("fail", key)
    raise ValueError(f"boom {key}")


@broker.task
def hold(key: str, release: str, seconds: float = 60.0) -> None:
    """Run until the file ``release`` exists (or ``seconds`` pass); taskiq runs it on a thread."""
    records.write("start", key)
    deadline = time.monotonic() + seconds
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # another process creates the file: nothing to await
    records.write("done", key)
