"""What the HTTP APIs (JSON and GraphQL) do to the broker: the same requests as the TCP protocol, built as request
frames and sent down the same path (validation, authorization, rate limits, group commit), so that HTTP can never
do what a TCP client with the same token could not.

:class:`Ops` is the only holder of the :class:`~replika_server.admin.seam.BrokerView`: the routes, the sampler and
GraphQL ask it, never the broker.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from typing import Any

from replika_protocol import ErrorCode, Frame
from replika_server.admin.errors import ApiError
from replika_server.admin.prometheus import render
from replika_server.admin.seam import BrokerView, QueueStats, RequestError, Stats, StoreCode, StoreError
from replika_server.auth import Principal
from replika_server.config import Config

__all__ = ["HTTP_OWNER", "ApiError", "Ops", "history_json", "message_json"]

#: The lease owner of fetches made over HTTP. Connection owners count from 1; this one is never released, so
#: HTTP leases end by ack, nack or their deadline, as a stateless client needs.
HTTP_OWNER = 0


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


def history_json(m: dict[str, Any]) -> dict[str, Any]:
    """A message's recorded history (the history op's reply) as JSON: a kept payload as ``message_json`` gives
    it (text or base64, as ``encoding`` says), None when the queue does not keep payloads."""
    out = dict(m)
    payload = m.get("payload")
    out["encoding"] = None
    if payload is not None:
        try:
            out["payload"], out["encoding"] = bytes(payload).decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            out["payload"], out["encoding"] = base64.b64encode(payload).decode("ascii"), "base64"
    out["headers"] = m.get("headers") or {}
    return out


class Ops:
    """Broker operations on behalf of a principal, raising :class:`ApiError`, and the broker's state as the
    sidecar shows it."""

    def __init__(self, node: BrokerView) -> None:
        self._node = node

    @property
    def config(self) -> Config:
        return self._node.config

    @property
    def version(self) -> str:
        return self._node.version

    async def call(self, principal: Principal, op: str, **fields: Any) -> Any:
        """Run request ``op`` with ``fields`` (as a TCP client would send them) and return its reply map."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Frame | StoreError] = loop.create_future()
        try:
            run = self._node.admit(principal, op, {"op": op, **fields}, HTTP_OWNER)
        except RequestError as exc:
            raise ApiError(exc.code, exc.message, exc.extra) from None
        run(functools.partial(_settle, done))
        result = await done
        if isinstance(result, StoreError):
            raise ApiError(ErrorCode(result.code), result.message)
        return result

    async def all_stats(self) -> list[QueueStats]:
        """Every queue's stats, unfiltered (for the sampler; callers filter by principal)."""
        result = await self._stats(None)
        if isinstance(result, StoreError):
            raise ApiError(ErrorCode(result.code), result.message)
        return list(result)

    async def store_answers(self) -> None:
        """A round trip through the broker's batch loop and the store, as cheap as one can be (for /readyz)."""
        result = await self._stats("replika-readyz-probe")
        if isinstance(result, StoreError) and result.code != StoreCode.NOT_FOUND:
            raise ApiError(ErrorCode(result.code), result.message)

    async def _stats(self, queue: str | None) -> list[QueueStats] | StoreError:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._node.broker.submit(Stats(queue), functools.partial(_settle, done))
        result: list[QueueStats] | StoreError = await done
        return result

    def authenticate(self, token: str | None) -> Principal | None:
        """Who ``token`` is; None for nobody. Without ``--auth`` everybody is the anonymous principal."""
        return self._node.authenticate(token)

    def successor(self, principal: Principal) -> Principal | None:
        """``principal`` after the latest auth reload: itself without ``--auth``, None once revoked."""
        auth = self._node.auth
        return principal if auth is None else auth.successor(principal)

    def consumers(self, queue: str) -> int:
        """Fetches long-polling ``queue`` now."""
        return self._node.broker.consumers(queue)

    def info(self) -> dict[str, Any]:
        node = self._node
        config = node.config
        return {
            "version": node.version,
            "uptime_seconds": round(time.time() - node.started_at, 3),
            "started_at": node.started_at,
            "connections": len(node.connections),
            "connections_accepted": node.accepted,
            "connections_refused": node.refused,
            "durability": config.durability,
            "store_bytes": node.store_bytes(),
            "max_store_bytes": config.max_store_size,
            "tls": config.tls_cert is not None,
            "auth": config.auth is not None,
            "port": node.port,
            "batches": node.broker.batches,
        }

    async def metrics(self) -> str:
        """``/metrics`` in the Prometheus text format."""
        node = self._node
        return render(
            await self.all_stats(),
            version=node.version,
            uptime=time.time() - node.started_at,
            connections=len(node.connections),
            accepted=node.accepted,
            refused=node.refused,
            store_bytes=node.store_bytes(),
            max_store_bytes=node.config.max_store_size,
            publish_confirm=node.publish_confirm,
            batch_requests=node.broker.batch_ops,
            commit_seconds=node.broker.commit_seconds,
        )
