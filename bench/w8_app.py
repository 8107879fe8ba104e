"""The Celery app of benchmark W8 (bench/w8.py), run by ``celery -A bench.w8_app worker``.

Environment: ``W8_BROKER`` (the broker URL: ``replika://``, ``redis://`` or ``amqp://``), ``W8_TRANSPORT_OPTIONS``
(JSON, Celery's ``broker_transport_options``), ``W8_STAMPS`` (the file ``noop`` appends to) and ``W8_EVENTS`` (the
file ``hold`` records to).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from celery import Celery

import replika.contrib.kombu  # noqa: F401  (registers replika://)

app = Celery("w8", broker=os.environ.get("W8_BROKER", "replika://127.0.0.1:8777"))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_default_queue="w8",
    worker_prefetch_multiplier=int(os.environ.get("W8_PREFETCH_MULTIPLIER", "4")),
    broker_connection_retry_on_startup=True,
    broker_transport_options=json.loads(os.environ.get("W8_TRANSPORT_OPTIONS") or "{}"),
    worker_hijack_root_logger=False,
)
_stamps: int | None = None


@app.task
def noop() -> None:
    """Nothing but an 8-byte CLOCK_MONOTONIC stamp appended to ``$W8_STAMPS``, for the harness to count: the
    same few microseconds on every transport."""
    global _stamps
    if _stamps is None:
        _stamps = os.open(os.environ["W8_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_stamps, struct.pack("d", time.monotonic()))


@app.task
def hold(release: str, seconds: float) -> None:
    """Record ``start <pid>``, run until the file ``release`` exists (at most ``seconds``), record ``done <pid>``."""
    _event("start")
    deadline = time.monotonic() + seconds
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # another process creates the file: nothing to await
    _event("done")


def _event(what: str) -> None:
    fd = os.open(os.environ["W8_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
