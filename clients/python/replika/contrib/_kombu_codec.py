"""kombu messages as Replika messages, and back.

The payload is the message body as it is (a Celery task's JSON, say). Replika headers are strings, so the rest of
the kombu message travels in a few of them: ``content-type``, ``content-encoding``, ``kombu-headers`` and
``kombu-properties`` (JSON), ``kombu-exchange`` and ``kombu-routing-key`` (where it was published: Celery sends a
retry back there). A Celery task (protocol 2) also gets ``celery-task``, ``celery-id`` and ``celery-retries``, and
each retry adds a line to ``celery-retry-history``, so that ``peek`` of a queue or of its dead-letter queue reads
without decoding anything. Should all that pass what Replika allows for one message's headers, the kombu
headers and properties move into the payload instead (an envelope, marked ``kombu-envelope: 1``).

Celery's ``eta`` (and ``countdown``, which Celery turns into an ``eta``) becomes the publish's server-side
``delay``; the priority (0-9, higher first, as in AMQP) becomes the message's Replika priority.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.utils.json import dumps
from kombu.utils.json import loads as _kombu_loads

from replika import Message as ReplikaMessage

__all__ = ["MAX_DELAY", "Incoming", "Outgoing", "decode", "encode", "remaining_delay"]

#: Replika's longest delay, seconds (30 days); a later ETA is reached in steps (``kombu-due``).
MAX_DELAY = 2_592_000.0
#: Bytes of headers kept in headers; Replika's limit for one message is 16 KiB, keys and values together.
HEADER_BUDGET = 12_000
#: Celery retry history kept per message: this many lines of at most LINE characters.
HISTORY_LINES = 20
HISTORY_LINE = 200
HISTORY_KEY = "replika_retry_history"  # a Celery custom header: Celery copies it into every retry
ENVELOPE_MAGIC = b"KMB1"
_DROPPED_PROPERTIES = ("delivery_info", "delivery_tag", "body_encoding", "replika_publish_id")


@dataclass(frozen=True, slots=True)
class Outgoing:
    payload: bytes
    headers: dict[str, str]
    priority: int
    delay: float
    ttl: float | None
    dedup_id: str | None


@dataclass(frozen=True, slots=True)
class Incoming:
    body: bytes
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str


def encode(message: dict[str, Any], exchange: str, routing_key: str, *, now: float | None = None) -> Outgoing:
    """The Replika publish for a message built by ``Channel.prepare_message``."""
    now = time.time() if now is None else now
    kheaders: dict[str, Any] = dict(message.get("headers") or {})
    props: dict[str, Any] = dict(message.get("properties") or {})
    body = message.get("body")
    if isinstance(body, str):
        body = body.encode(message.get("content-encoding") or "utf-8")
    elif body is None:
        body = b""
    headers: dict[str, str] = {}
    if message.get("content-type"):
        headers["content-type"] = str(message["content-type"])
    if message.get("content-encoding"):
        headers["content-encoding"] = str(message["content-encoding"])
    if exchange:
        headers["kombu-exchange"] = exchange
    headers["kombu-routing-key"] = routing_key
    headers.update(_celery_headers(kheaders))
    delay, due = _delay(kheaders, now)
    if due is not None:
        headers["kombu-due"] = f"{due:.3f}"
    inner = {k: v for k, v in props.items() if k not in _DROPPED_PROPERTIES}
    packed_headers = dumps(kheaders) if kheaders else ""
    packed_props = dumps(inner) if inner else ""
    payload = bytes(body)
    if len(packed_headers) + len(packed_props) + _size(headers) > HEADER_BUDGET:
        envelope = dumps({"headers": kheaders, "properties": inner}).encode()
        payload = ENVELOPE_MAGIC + struct.pack(">I", len(envelope)) + envelope + payload
        headers["kombu-envelope"] = "1"
    else:
        if packed_headers:
            headers["kombu-headers"] = packed_headers
        if packed_props:
            headers["kombu-properties"] = packed_props
    expiration = props.get("expiration")
    return Outgoing(
        payload,
        headers,
        _priority(props.get("priority")),
        delay,
        float(expiration) / 1000 if expiration else None,
        props.get("replika_publish_id"),
    )


def loads(text: str | bytes) -> Any:
    """kombu's JSON, whose encoder writes types JSON lacks (datetime, UUID, ...) as ``{"__type__": ...}``
    objects; text without one (a Celery task's headers, say) takes the standard library's faster path."""
    if (b'"__type__"' in text) if isinstance(text, bytes) else ('"__type__"' in text):
        return _kombu_loads(text)
    return json.loads(text)


def decode(msg: ReplikaMessage) -> Incoming:
    h = msg.headers
    payload = msg.payload
    if h.get("kombu-envelope") == "1" and payload[:4] == ENVELOPE_MAGIC:
        (size,) = struct.unpack(">I", payload[4:8])
        envelope = loads(payload[8 : 8 + size])
        kheaders, props, body = envelope["headers"], envelope["properties"], payload[8 + size :]
    else:
        kheaders = loads(h["kombu-headers"]) if "kombu-headers" in h else {}
        props = loads(h["kombu-properties"]) if "kombu-properties" in h else {}
        body = payload
    return Incoming(
        body,
        h.get("content-type"),
        h.get("content-encoding"),
        kheaders,
        props,
        h.get("kombu-exchange", ""),
        h.get("kombu-routing-key", msg.queue),
    )


def remaining_delay(msg: ReplikaMessage, now: float | None = None) -> float:
    """Seconds until a message published with an ETA beyond :data:`MAX_DELAY` is due (0: due now)."""
    due = msg.headers.get("kombu-due")
    if due is None:
        return 0.0
    left = float(due) - (time.time() if now is None else now)
    return left if left > 1.0 else 0.0


def priority_of(msg: ReplikaMessage) -> int:
    return _priority(decode(msg).properties.get("priority"))


def _priority(value: Any) -> int:
    try:
        return min(9, max(0, int(value)))
    except (TypeError, ValueError):
        return 0


def _delay(kheaders: dict[str, Any], now: float) -> tuple[float, float | None]:
    """Celery's ``eta`` header as (delay now, due time when it is beyond one delay)."""
    eta = kheaders.get("eta")
    if not eta:
        return 0.0, None
    try:
        when = datetime.fromisoformat(str(eta))
    except ValueError:
        return 0.0, None  # not a Celery ETA: let the worker judge it
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    due = when.timestamp()
    delay = due - now
    if delay <= 0:
        return 0.0, None
    if delay > MAX_DELAY:
        return MAX_DELAY, due
    return delay, None


def _celery_headers(kheaders: dict[str, Any]) -> dict[str, str]:
    if "task" not in kheaders or "id" not in kheaders:
        return {}
    out = {"celery-task": str(kheaders["task"]), "celery-id": str(kheaders["id"])}
    retries = _int(kheaders.get("retries"))
    out["celery-retries"] = str(retries)
    if retries > 0:
        history = [str(line) for line in kheaders.get(HISTORY_KEY) or []]
        history.append(_retry_line(retries))
        history = history[-HISTORY_LINES:]
        kheaders[HISTORY_KEY] = history
        out["celery-retry-history"] = "\n".join(history)
    elif HISTORY_KEY in kheaders:
        out["celery-retry-history"] = "\n".join(str(line) for line in kheaders[HISTORY_KEY])
    return out


def _retry_line(retries: int) -> str:
    """One line of retry history: the retry's number and the exception being handled while it is published
    (Celery's ``self.retry()`` and ``autoretry_for`` publish the retry from inside the task's ``except``)."""
    exc = sys.exc_info()[1]
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "retried"
    line = f"retry {retries}: {reason}".replace("\n", " ")
    return line if len(line) <= HISTORY_LINE else line[: HISTORY_LINE - 3] + "..."


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _size(headers: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
