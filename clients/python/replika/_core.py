"""The SDK's sans-IO core, shared by :class:`AsyncClient` and the blocking :class:`Client`.

It builds request frames, assigns correlation ids, decodes reply bytes and turns replies into values or
exceptions. The two clients add only the I/O, so they cannot disagree on the protocol.
"""

from __future__ import annotations

import itertools
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from replika._message import MessageData
from replika.errors import BadRequest, ReplikaError, StaleLease, error_from_reply
from replika_protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_PAYLOAD,
    SUPPORTED_VERSIONS,
    Frame,
    FrameDecoder,
    encode_frame,
    is_valid_queue_name,
)

DEFAULT_URL = "replika://127.0.0.1:8777"
DEFAULT_PORT = 8777
# Bytes a publish frame needs beyond its payloads: map keys, queue name, and per-payload bin headers.
_FRAME_OVERHEAD = 512
_PER_PAYLOAD_OVERHEAD = 8


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> Endpoint:
    """``replika://host:port``, or ``replikas://host:port`` for TLS (the port defaults to 8777)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("replika", "replikas"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use replika://host:port or replikas://")
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT, tls=parts.scheme == "replikas")


def tls_context(endpoint: Endpoint, ssl_option: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS context to connect with: the caller's, else the system's defaults for ``replikas://`` (which
    verify the server's certificate and name), else None (plain TCP)."""
    if ssl_option is not None:
        return ssl_option
    return ssl.create_default_context() if endpoint.tls else None


def check_queue(name: str) -> None:
    if not is_valid_queue_name(name):
        raise BadRequest(f"invalid queue name {name!r}: 1-255 characters of [A-Za-z0-9._:-]", "BAD_REQUEST")


class ClientCore:
    """Request ids, framing and server limits of one connection."""

    def __init__(self, client_name: str, token: str | None) -> None:
        self._ids = itertools.count(1)
        self.client_name = client_name
        self.token = token
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.max_frame = DEFAULT_MAX_FRAME
        self.max_batch = DEFAULT_MAX_BATCH
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.idle_timeout = 0.0
        self.server = ""

    def reset(self) -> None:
        """A new connection: forget buffered bytes (request ids keep counting; they never repeat)."""
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)

    def request(self, op: str, **fields: Any) -> tuple[int, bytes]:
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        return rid, encode_frame(fields)

    def hello(self) -> tuple[int, bytes]:
        fields: dict[str, Any] = {"versions": list(SUPPORTED_VERSIONS), "client": self.client_name}
        if self.token is not None:
            fields["token"] = self.token
        return self.request("hello", **fields)

    def on_hello(self, reply: Frame) -> None:
        check(reply)
        self.max_frame = int(reply.get("max_frame", DEFAULT_MAX_FRAME))
        self.max_batch = int(reply.get("max_batch", DEFAULT_MAX_BATCH))
        self.max_payload = int(reply.get("max_payload", DEFAULT_MAX_PAYLOAD))
        self.server = str(reply.get("server", ""))
        self.idle_timeout = float(reply.get("idle_timeout") or 0.0)
        self.decoder.max_frame = self.max_frame

    @property
    def keepalive_interval(self) -> float | None:
        """Seconds of silence after which to ping, so the server never sees the connection idle; None: never."""
        return self.idle_timeout / 3 if self.idle_timeout > 0 else None

    # ----------------------------------------------------------------------------------------------- requests
    def publish_chunks(
        self,
        queue: str,
        payloads: Sequence[bytes | bytearray | memoryview],
        headers: list[dict[str, str] | None] | None,
        dedup_ids: list[str | None] | None = None,
        op: str = "publish",
        **extra: Any,
    ) -> Iterator[tuple[int, bytes]]:
        """Publish requests for ``payloads``, split to respect the server's batch and frame limits; ``extra``
        fields (priority, delay, ttl) go in every one. ``op`` "publish_topic" sends ``queue`` as the topic."""
        if op == "publish":
            check_queue(queue)
        extra = {k: v for k, v in extra.items() if v is not None}
        budget = self.max_frame - _FRAME_OVERHEAD
        start = 0
        n = len(payloads)
        while start < n:
            size = 0
            stop = start
            while stop < n and stop - start < self.max_batch:
                item = len(payloads[stop]) + _PER_PAYLOAD_OVERHEAD
                hdrs = headers[stop] if headers is not None else None
                if hdrs:
                    item += sum(len(k.encode()) + len(v.encode()) + 10 for k, v in hdrs.items())
                if dedup_ids is not None and dedup_ids[stop] is not None:
                    item += len(str(dedup_ids[stop]).encode()) + 5
                if stop > start and size + item > budget:
                    break
                size += item
                stop += 1
            fields: dict[str, Any] = {"topic" if op == "publish_topic" else "queue": queue, **extra}
            fields["payloads"] = payloads[start:stop]
            if headers is not None:
                fields["headers"] = headers[start:stop]
            if dedup_ids is not None:
                fields["dedup_ids"] = dedup_ids[start:stop]
            yield self.request(op, **fields)
            start = stop

    def settle_chunks(self, op: str, msgs: Iterable[MessageData], **extra: Any) -> Iterator[tuple[int, bytes]]:
        """Ack/nack/reject/touch requests for ``msgs``, one per queue and batch limit."""
        by_queue: dict[str, list[MessageData]] = {}
        for m in msgs:
            by_queue.setdefault(m.queue, []).append(m)
        for queue, batch in by_queue.items():
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i : i + self.max_batch]
                # Two flat arrays, not an array of pairs: much cheaper to encode and decode on both sides.
                ids = [m.id for m in chunk]
                tokens = [m.token for m in chunk]
                yield self.request(op, queue=queue, ids=ids, tokens=tokens, **extra)


def hand_back_request(core: ClientCore, queue: str, wire_msgs: list[Any]) -> tuple[int, bytes]:
    """The nack returning deliveries the application never saw (wire arrays of a fetch reply): not attempts."""
    ids = [m[0] for m in wire_msgs]
    tokens = [m[1] for m in wire_msgs]
    return core.request("nack", queue=queue, ids=ids, tokens=tokens, unseen=True)


def check(reply: Frame) -> Frame:
    """``reply`` if it is a success, else raise its error."""
    if reply.get("ok") is not True:
        raise error_from_reply(reply)
    return reply


def publish_ids(reply: Frame) -> list[int]:
    """The id of each payload of a publish: ``ids`` when the server sent them (dedup ids), else the range."""
    check(reply)
    if reply.get("ids") is not None:
        return [int(i) for i in reply["ids"]]
    first = int(reply["first_id"])
    return list(range(first, first + int(reply["count"])))


def topic_ids(replies: Iterable[Frame]) -> dict[str, list[int]]:
    """Queue -> ids (one per payload, in order) from the replies of a topic publish's requests."""
    out: dict[str, list[int]] = {}
    for reply in replies:
        check(reply)
        for queue, ids in (reply.get("ids") or {}).items():
            out.setdefault(str(queue), []).extend(int(i) for i in ids)
    return out


def publish_options(
    priority: int | None, delay: float | None, ttl: float | None, dedup_ids: Sequence[str | None] | None, n: int
) -> tuple[dict[str, Any], list[str | None] | None]:
    """The extra fields of a publish, checked here so that a mistake fails before anything is sent."""
    if priority is not None and (isinstance(priority, bool) or not 0 <= priority <= 9):
        raise ValueError("priority must be an int from 0 to 9")
    if dedup_ids is not None and len(dedup_ids) != n:
        raise ValueError("dedup_ids needs one entry per payload")
    return {"priority": priority or None, "delay": delay or None, "ttl": ttl}, (
        list(dedup_ids) if dedup_ids is not None else None
    )


def settle_failures(replies: Iterable[Frame]) -> None:
    """Raise :class:`StaleLease` naming every refused lease, after all replies were checked."""
    failed: dict[int, str] = {}
    first_error: ReplikaError | None = None
    for reply in replies:
        try:
            check(reply)
        except ReplikaError as exc:
            first_error = first_error or exc
            continue
        failed.update(reply.get("failed") or {})
    if first_error is not None:
        raise first_error
    if failed:
        raise StaleLease(f"{len(failed)} lease(s) no longer current: {sorted(failed)}", "STALE_LEASE", failed)
