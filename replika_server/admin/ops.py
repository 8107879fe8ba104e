"""What the HTTP APIs (JSON and GraphQL) do to the broker: the same requests as the TCP protocol, built as request
frames and sent down the same path (validation, authorization, rate limits, group commit), so that HTTP can never
do what a TCP client with the same token could not.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from typing import TYPE_CHECKING, Any

from replika_protocol import ErrorCode, Frame
from replika_server.auth import Principal
from replika_server.requests import RequestError
from replika_server.store import QueueStats, Stats, StoreCode, StoreError

if TYPE_CHECKING:
    from replika_server.node import Node as Server

__all__ = ["HTTP_OWNER", "ApiError", "Ops", "message_json"]

#: The lease owner of fetches made over HTTP. Connection owners count from 1; this one is never released, so
#: HTTP leases end by ack, nack or their deadline, as a stateless client needs.
HTTP_OWNER = 0

#: HTTP status per wire error code.
STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_MANY_QUEUES: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.BATCH_TOO_LARGE: 413,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUEUE_FULL: 507,
    ErrorCode.STORE_FULL: 507,
    ErrorCode.SHUTTING_DOWN: 503,
}


class ApiError(Exception):
    """An error for an HTTP client: the wire code, a message, the HTTP status and extra fields."""

    def __init__(self, code: ErrorCode, message: str, extra: Frame | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra or {}
        self.status = STATUS.get(code, 500)

    @property
    def extensions(self) -> dict[str, Any]:
        """GraphQL errors carry these (graphql-core copies an original error's ``extensions``)."""
        return {"code": self.code.value, **self.extra}

    def body(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, **self.extra}


def _settle(done: asyncio.Future[Any], result: Any) -> None:
    """Hand a broker result to an HTTP request that may have gone (a client that hung up, a shutdown)."""
    if not done.done():
        done.set_result(result)


def message_json(queue: str, m: list[Any] | tuple[Any, ...], leased: bool) -> dict[str, Any]:
    """A delivered (``leased``: with its lease token) or peeked message as JSON. The payload is text when it is
    UTF-8, else base64, as ``encoding`` says."""
    if leased:
        mid, token, attempts, published_at, payload, headers = m
    else:
        mid, attempts, published_at, payload, headers = m
        token = None
    try:
        text, encoding = bytes(payload).decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    out: dict[str, Any] = {
        "queue": queue,
        "id": mid,
        "attempts": attempts,
        "published_at": published_at,
        "payload": text,
        "encoding": encoding,
        "headers": headers or {},
    }
    if token is not None:
        out["lease"] = token
    return out


class Ops:
    """Broker operations on behalf of a principal, raising :class:`ApiError`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.broker = server.broker

    async def call(self, principal: Principal, op: str, **fields: Any) -> Any:
        """Run request ``op`` with ``fields`` (as a TCP client would send them) and return its reply map."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Frame | StoreError] = loop.create_future()
        try:
            run = self.server.admit(principal, op, {"op": op, **fields}, HTTP_OWNER)
        except RequestError as exc:
            raise ApiError(exc.code, exc.message, exc.extra) from None
        run(functools.partial(_settle, done))
        result = await done
        if isinstance(result, StoreError):
            raise ApiError(ErrorCode(result.code), result.message)
        return result

    async def all_stats(self) -> list[QueueStats]:
        """Every queue's stats, unfiltered (for the sampler; callers filter by principal)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self.broker.submit(Stats(None), functools.partial(_settle, done))
        result = await done
        if isinstance(result, StoreError):
            raise ApiError(ErrorCode(result.code), result.message)
        return list(result)

    async def store_answers(self) -> None:
        """A round trip through the broker's batch loop and the store, as cheap as one can be (for /readyz)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.broker.submit(Stats("replika-readyz-probe"), functools.partial(_settle, done))
        result = await done
        if isinstance(result, StoreError) and result.code != StoreCode.NOT_FOUND:
            raise ApiError(ErrorCode(result.code), result.message)

    def info(self) -> dict[str, Any]:
        server = self.server
        config = server.config
        return {
            "version": server.version,
            "uptime_seconds": round(time.time() - server.started_at, 3),
            "started_at": server.started_at,
            "connections": len(server.connections),
            "connections_accepted": server.accepted,
            "connections_refused": server.refused,
            "durability": config.durability,
            "store_bytes": server.store_bytes(),
            "max_store_bytes": config.max_store_size,
            "tls": config.tls_cert is not None,
            "auth": config.auth is not None,
            "port": server.port,
            "batches": self.broker.batches,
        }
