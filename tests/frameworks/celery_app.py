"""The Celery app whose workers tests/test_contrib_celery.py runs (``celery -A tests.frameworks.celery_app``).

Environment: ``REPLIKA_TEST_BROKER`` (the broker URL), ``REPLIKA_TEST_RECORDS`` (the file tasks record to, see
records.py) and ``REPLIKA_TEST_LEASE`` (the transport's lease, seconds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery

import replika.contrib.kombu  # noqa: F401  (registers replika://)
from tests.frameworks import records

app = Celery("replika_tests", broker=os.environ.get("REPLIKA_TEST_BROKER", "replika://127.0.0.1:8777"))
app.conf.update(
    task_acks_late=True,
    # A task that fails for good is rejected (to the dead-letter queue) rather than acked.
    task_acks_on_failure_or_timeout=False,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"lease": float(os.environ.get("REPLIKA_TEST_LEASE", "30"))},
    worker_hijack_root_logger=False,
)


@app.task
def run(key: str) -> None:
    records.write("run", key)


@app.task(bind=True, autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0.2)
def fail(self: object, key: str) -> None:
    records.write("fail", key)
    raise ValueError(f"boom {key}")


@app.task
def hold(key: str, release: str, seconds: float = 60.0) -> None:
    """Run until the file ``release`` exists (or ``seconds`` pass)."""
    records.write("start", key)
    deadline = time.monotonic() + seconds
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # another process creates the file: nothing to await
    records.write("done", key)
