"""The Dramatiq actors whose workers tests/test_contrib_dramatiq.py runs (``dramatiq tests.frameworks.dramatiq_app``).

Environment: ``REPLIKA_TEST_BROKER``, ``REPLIKA_TEST_RECORDS`` and ``REPLIKA_TEST_LEASE`` as for celery_app.py, and
``REPLIKA_TEST_QUEUE``, the queue of every actor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramatiq

from replika.contrib.dramatiq import ReplikaBroker
from tests.frameworks import records

broker = ReplikaBroker(
    os.environ.get("REPLIKA_TEST_BROKER", "replika://127.0.0.1:8777"),
    lease=float(os.environ.get("REPLIKA_TEST_LEASE", "30")),
)
dramatiq.set_broker(broker)
QUEUE = os.environ.get("REPLIKA_TEST_QUEUE", "default")


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def run(key: str) -> None:
    records.write("run", key)


@dramatiq.actor(queue_name=QUEUE, max_retries=2, min_backoff=200, max_backoff=200)
def fail(key: str) -> None:
    records.write("fail", key)
    raise ValueError(f"boom {key}")


@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=120_000)
def hold(key: str, release: str, seconds: float = 60.0) -> None:
    """Run until the file ``release`` exists (or ``seconds`` pass)."""
    records.write("start", key)
    deadline = time.monotonic() + seconds
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # another process creates the file: nothing to await
    records.write("done", key)
