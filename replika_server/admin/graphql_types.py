"""The GraphQL schema's object types and their builders from the admin views' JSON (used by
:mod:`replika_server.admin.graphql`, which holds the query and mutation roots and the router)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.scalars import JSON

from replika_server.admin.ops import history_json

__all__ = ["BrokerInfo", "HistoryEvent", "Message", "MessageHistory", "Queue", "Rates", "history", "message", "queue"]


@strawberry.type
class Rates:
    publish: float = strawberry.field(description="messages published per second (last sample)")
    deliver: float
    ack: float
    nack: float


@strawberry.type
class Queue:
    name: str
    ready: int
    in_flight: int
    delayed: int
    total: int
    bytes: int
    dead: int | None = strawberry.field(
        description="messages in this queue's dead-letter queue; null for a token that may not see that queue"
    )
    dead_letter: str
    consumers: int = strawberry.field(description="fetches long-polling this queue now")
    max_attempts: int | None
    max_length: int | None
    max_bytes: int | None
    rates: Rates
    counters: JSON


@strawberry.type
class Message:
    id: int
    queue: str
    attempts: int
    published_at: float
    payload: str = strawberry.field(description="UTF-8 text, or base64 when encoding is base64")
    encoding: str
    headers: JSON


@strawberry.type
class HistoryEvent:
    at: float = strawberry.field(description="unix seconds")
    kind: str = strawberry.field(description="published, delivered, nacked, lease_expired, acked, ... (SPEC.md)")
    attempt: int
    connection: int
    detail: JSON = strawberry.field(description="the kind's own fields: reason, to, id, delay, by...")


@strawberry.type
class MessageHistory:
    id: int
    queue: str
    state: str
    published_at: float
    headers: JSON
    payload: str | None = strawberry.field(description="kept payload: UTF-8 text, or base64 when encoding says")
    encoding: str | None
    events: list[HistoryEvent]


def _detail(event: dict[str, Any], base: tuple[str, ...]) -> Any:
    return {k: v for k, v in event.items() if k not in base}


def history(m: dict[str, Any]) -> MessageHistory:
    m = history_json(m)
    base = ("at", "kind", "attempt", "connection")
    events = [
        HistoryEvent(
            at=e["at"],
            kind=e["kind"],
            attempt=e["attempt"],
            connection=e["connection"],
            detail=_detail(e, base),
        )
        for e in m["events"]
    ]
    return MessageHistory(
        id=m["id"],
        queue=m["queue"],
        state=m["state"],
        published_at=m["published_at"],
        headers=m["headers"],
        payload=m["payload"],
        encoding=m["encoding"],
        events=events,
    )


@strawberry.type
class BrokerInfo:
    version: str
    uptime_seconds: float
    connections: int
    durability: str
    store_bytes: int
    max_store_bytes: int
    tls: bool
    auth: bool


def queue(row: dict[str, Any]) -> Queue:
    rates = row.get("rates") or {}
    return Queue(
        name=row["queue"],
        ready=row["ready"],
        in_flight=row["in_flight"],
        delayed=row["delayed"],
        total=row["total"],
        bytes=row.get("bytes", 0),
        dead=row["dead"],
        dead_letter=row["dead_letter"],
        consumers=row.get("consumers", 0),
        max_attempts=row.get("max_attempts"),
        max_length=row.get("max_length"),
        max_bytes=row.get("max_bytes"),
        rates=Rates(
            publish=rates.get("publish", 0.0),
            deliver=rates.get("deliver", 0.0),
            ack=rates.get("ack", 0.0),
            nack=rates.get("nack", 0.0),
        ),
        counters=row.get("counters", {}),
    )


def message(m: dict[str, Any]) -> Message:
    return Message(
        id=m["id"],
        queue=m["queue"],
        attempts=m["attempts"],
        published_at=m["published_at"],
        payload=m["payload"],
        encoding=m["encoding"],
        headers=m["headers"],
    )
