"""``/metrics`` in the Prometheus text exposition format (version 0.0.4), names prefixed ``replika_`` with their
unit in the name. Written out by hand: the format is a few lines of text, and the broker keeps its own counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from replika_server.admin.seam import QueueStats
from replika_server.metrics import Histogram

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric name, counter key in QueueStats.counters, help)
_QUEUE_COUNTERS = (
    ("replika_messages_published_total", "published", "Messages stored by publish, per queue."),
    ("replika_messages_delivered_total", "delivered", "Deliveries (messages in fetch replies), per queue."),
    ("replika_messages_acked_total", "acked", "Messages acked, per queue."),
    ("replika_messages_nacked_total", "nacked", "Messages nacked, per queue."),
    ("replika_leases_expired_total", "expired", "Leases ended by their deadline or their connection, per queue."),
    ("replika_messages_dead_lettered_total", "dead_lettered", "Messages moved to the dead-letter queue, per queue."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Iterable[tuple[str, str]] = ()) -> None:
        pairs = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
        self.lines.append(f"{name}{{{pairs}}} {_number(value)}" if pairs else f"{name} {_number(value)}")

    def histogram(self, name: str, help_text: str, h: Histogram) -> None:
        self.family(name, "histogram", help_text)
        for bound, count in h.cumulative():
            self.sample(f"{name}_bucket", count, [("le", _number(bound))])
        self.sample(f"{name}_sum", h.sum)
        self.sample(f"{name}_count", h.count)


def render(
    stats: list[QueueStats],
    *,
    version: str,
    uptime: float,
    connections: int,
    accepted: int,
    refused: int,
    store_bytes: int,
    max_store_bytes: int,
    publish_confirm: Histogram,
    batch_requests: Histogram,
    commit_seconds: Histogram,
) -> str:
    w = _Writer()
    w.family("replika_build_info", "gauge", "Always 1; the broker's version as a label.")
    w.sample("replika_build_info", 1, [("version", version)])
    w.family("replika_uptime_seconds", "gauge", "Seconds since the broker started.")
    w.sample("replika_uptime_seconds", round(uptime, 3))
    w.family("replika_connections", "gauge", "Open client connections.")
    w.sample("replika_connections", connections)
    w.family("replika_connections_accepted_total", "counter", "Client connections accepted.")
    w.sample("replika_connections_accepted_total", accepted)
    w.family("replika_connections_refused_total", "counter", "Client connections refused at --max-connections.")
    w.sample("replika_connections_refused_total", refused)
    w.family("replika_store_size_bytes", "gauge", "Size of the store's data file.")
    w.sample("replika_store_size_bytes", store_bytes)
    w.family("replika_store_max_size_bytes", "gauge", "The store's size limit (--max-store-size).")
    w.sample("replika_store_max_size_bytes", max_store_bytes)
    w.family("replika_queues", "gauge", "Queues.")
    w.sample("replika_queues", len(stats))
    w.family("replika_queue_messages", "gauge", "Messages stored per queue, by state.")
    for s in stats:
        for state, value in (("ready", s.ready), ("in_flight", s.in_flight), ("delayed", s.delayed)):
            w.sample("replika_queue_messages", value, [("queue", s.name), ("state", state)])
    w.family("replika_queue_bytes", "gauge", "Payload and header bytes stored per queue.")
    for s in stats:
        w.sample("replika_queue_bytes", s.bytes, [("queue", s.name)])
    for name, key, help_text in _QUEUE_COUNTERS:
        w.family(name, "counter", help_text + " Since the broker started.")
        for s in stats:
            w.sample(name, s.counters.get(key, 0), [("queue", s.name)])
    w.histogram(
        "replika_publish_confirm_seconds",
        "From a publish request's arrival to its durable confirmation.",
        publish_confirm,
    )
    w.histogram("replika_commit_batch_requests", "Requests per group commit.", batch_requests)
    w.histogram("replika_commit_duration_seconds", "Applying and committing one group commit.", commit_seconds)
    return "\n".join(w.lines) + "\n"
