"""The admin sidecar's HTTP application: JSON admin API (OpenAPI docs at ``/docs``), ``/metrics``, health checks,
the live feed, the dashboard's files and GraphQL.

Authentication: when the broker runs with ``--auth``, every ``/api``, ``/graphql`` and ``/metrics`` request needs a
token (``Authorization: Bearer <token>``, or ``?token=`` where a browser cannot set headers, as for
``EventSource``), with the same permissions as over TCP. Browsers calling from another origin are refused unless
listed with ``--admin-cors-origin``; on a loopback address, requests must also name a loopback host, which stops
DNS-rebinding pages from reaching the API through the user's browser.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime,
# including dependency types defined inside create_app().
import asyncio
import base64
import binascii
import importlib.resources
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from swagger_ui_bundle import swagger_ui_path

from replika_protocol import ErrorCode
from replika_server.admin.graphql import graphql_router
from replika_server.admin.ops import ApiError, Ops, message_json
from replika_server.admin.prometheus import CONTENT_TYPE, render
from replika_server.admin.sampler import Sampler
from replika_server.auth import Principal
from replika_server.config import is_loopback

if TYPE_CHECKING:
    from replika_server.node import Node as Server

__all__ = ["create_app"]

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
#: Longest an HTTP fetch may long-poll: an HTTP client or proxy in between rarely waits longer.
MAX_HTTP_WAIT = 60.0

Queue = Annotated[str, "a queue name: 1-255 characters of [A-Za-z0-9._:-]"]


class PublishMessage(BaseModel):
    payload: str = Field(description="the message: text, or base64 when encoding is base64")
    encoding: str = Field("utf-8", description="utf-8 (default) or base64")
    headers: dict[str, str] | None = None


class PublishBatch(BaseModel):
    messages: list[PublishMessage]


class Settle(BaseModel):
    leases: list[tuple[int, int]] = Field(description="[id, lease] pairs from fetch replies")
    delay: float | None = Field(None, description="nack only: seconds before the messages are ready again")


def create_app(server: "Server", ops: Ops, sampler: Sampler) -> FastAPI:
    config = server.config
    app = FastAPI(
        title="Replika admin API",
        version=server.version,
        description=(
            "Queues, messages and the broker's state, over HTTP. With `--auth`, send `Authorization: Bearer "
            "<token>`; permissions are those of the TCP protocol (SPEC.md). Errors carry the protocol's stable "
            "`code`. Payloads are UTF-8 text, or base64 as `encoding` says."
        ),
        docs_url=None,  # served below from swagger-ui-bundle's files, so the docs work without internet access
        redoc_url=None,
    )
    loopback_only = is_loopback(config.admin_host)
    allowed_origins = set(config.admin_cors_origins)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = _hostname(request.headers.get("host", ""))
        if loopback_only and host not in _LOOPBACK_HOSTS:
            return _error(ApiError(ErrorCode.FORBIDDEN, f"host {host!r} is not this loopback-only admin sidecar"))
        if request.url.path.startswith(_GUARDED):
            # Authenticate before anything reads the body: a route's body model is parsed before its dependencies.
            try:
                request.state.principal = _authenticate(server, request)
            except ApiError as exc:
                return _error(exc)
        if request.method in ("POST", "PUT", "PATCH"):
            # Bodies are read whole before anything can refuse them: bound them by the header, up front.
            if "chunked" in request.headers.get("transfer-encoding", "").lower():
                return _error(ApiError(ErrorCode.BAD_REQUEST, "send a Content-Length (chunked bodies are refused)"))
            length = request.headers.get("content-length", "0")
            if not length.isdigit() or int(length) > config.max_frame:
                message = f"request bodies are limited to {config.max_frame} bytes (--max-frame)"
                return _error(ApiError(ErrorCode.PAYLOAD_TOO_LARGE, message))
        origin = request.headers.get("origin")
        if origin is not None and origin not in allowed_origins:
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if origin != own:
                return _error(
                    ApiError(
                        ErrorCode.FORBIDDEN,
                        f"cross-origin request from {origin} refused; allow it with --admin-cors-origin",
                    )
                )
        return await call_next(request)

    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(allowed_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    def principal(request: Request) -> Principal:
        found: Principal | None = getattr(request.state, "principal", None)
        return found if found is not None else _authenticate(server, request)

    Who = Annotated[Principal, Depends(principal)]

    def visible(p: Principal, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if p.admin:
            return rows
        # A dead-letter queue the token may not see is not counted for it either.
        return [r if p.may_see(r["dead_letter"]) else {**r, "dead": None} for r in rows if p.may_see(r["queue"])]

    async def queue_row(p: Principal, queue: str) -> dict[str, Any]:
        reply = await ops.call(p, "stats", queue=queue)  # authorizes, and says NOT_FOUND for a missing queue
        row = sampler.latest.get(queue)
        if row is None:  # created since the last sample
            row = {**reply["stats"], "dead": 0, "consumers": ops.broker.consumers(queue), "rates": {}}
        else:
            row = {**row, **reply["stats"]}
        return row

    # ------------------------------------------------------------------------------------------- health
    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The broker accepts clients and its store answers")
    async def readyz() -> Response:
        try:
            await asyncio.wait_for(ops.store_answers(), 5.0)
        except (ApiError, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc) or "store timeout"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)")
    async def metrics(p: Who) -> Response:
        if not p.admin:
            raise ApiError(ErrorCode.FORBIDDEN, f"token {p.name!r} may not read the broker's metrics (needs admin)")
        stats = await ops.all_stats()
        text = render(
            stats,
            version=server.version,
            uptime=time.time() - server.started_at,
            connections=len(server.connections),
            accepted=server.accepted,
            refused=server.refused,
            store_bytes=server.store_bytes(),
            max_store_bytes=config.max_store_size,
            publish_confirm=server.publish_confirm,
            batch_requests=server.broker.batch_ops,
            commit_seconds=server.broker.commit_seconds,
        )
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------------------------------- broker
    @app.get("/api/info", tags=["broker"], summary="Version, uptime, connections, store size, durability")
    async def info(p: Who) -> dict[str, Any]:
        return ops.info()

    @app.get("/api/queues", tags=["queues"], summary="Every queue with its counts and rates")
    async def queues(p: Who) -> dict[str, Any]:
        if not sampler.latest:
            await ops.call(p, "queues")  # the first sample may not be in yet: make sure the store answers
        return {"queues": visible(p, list(sampler.latest.values())), "sampled_at": sampler.sampled_at}

    @app.get("/api/queues/{queue}", tags=["queues"], summary="One queue: counts, options, rates, history")
    async def queue(p: Who, queue: Queue) -> dict[str, Any]:
        row = await queue_row(p, queue)
        row["history"] = list(sampler.history.get(queue, ()))
        return row

    @app.get("/api/queues/{queue}/messages", tags=["messages"], summary="Peek at ready messages (no lease)")
    async def peek(p: Who, queue: Queue, max: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        reply = await ops.call(p, "peek", queue=queue, max=max)
        return {"messages": [message_json(queue, m, leased=False) for m in reply["msgs"]]}

    @app.get(
        "/api/queues/{queue}/dead-letters",
        tags=["messages"],
        summary="Peek at the messages in this queue's dead-letter queue",
    )
    async def dead_letters(p: Who, queue: Queue, max: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        row = await queue_row(p, queue)
        dlq = row["dead_letter"]
        try:
            reply = await ops.call(p, "peek", queue=dlq, max=max)
        except ApiError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            return {"dead_letter": dlq, "messages": []}
        return {"dead_letter": dlq, "messages": [message_json(dlq, m, leased=False) for m in reply["msgs"]]}

    @app.post("/api/queues/{queue}/purge", tags=["queues"], summary="Delete every message that is not leased")
    async def purge(p: Who, queue: Queue) -> dict[str, Any]:
        return {"purged": (await ops.call(p, "purge", queue=queue))["purged"]}

    @app.delete("/api/queues/{queue}", tags=["queues"], summary="Delete the queue and its messages")
    async def delete(p: Who, queue: Queue) -> dict[str, Any]:
        await ops.call(p, "delete_queue", queue=queue)
        return {"deleted": queue}

    @app.post(
        "/api/queues/{queue}/redrive",
        tags=["queues"],
        summary="Move this queue's dead-lettered messages back to the queues they came from",
    )
    async def redrive(p: Who, queue: Queue, max: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
        row = await queue_row(p, queue)
        dlq = row["dead_letter"]
        try:
            # What is there now, and no more: a consumer that rejects at once must not keep this going for ever.
            budget = (await ops.call(p, "stats", queue=dlq))["stats"]["total"] if max is None else max
        except ApiError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            return {"moved": 0, "dead_letter": dlq}
        moved = 0
        while moved < budget:
            reply = await ops.call(p, "redrive", queue=dlq, max=min(budget - moved, server.config.max_batch))
            if not reply["moved"]:
                break
            moved += reply["moved"]
        return {"moved": moved, "dead_letter": dlq}

    # ------------------------------------------------------------------------------------------- messages
    @app.post(
        "/api/queues/{queue}/publish",
        tags=["messages"],
        summary="Publish the request body as one message (as NSQ's /pub: curl -d 'hello' .../publish)",
    )
    async def publish(p: Who, queue: Queue, request: Request) -> dict[str, Any]:
        body = await request.body()
        reply = await ops.call(p, "publish", queue=queue, payloads=[body])
        return {"id": reply["first_id"]}

    @app.post("/api/queues/{queue}/publish-batch", tags=["messages"], summary="Publish many messages (JSON)")
    async def publish_batch(p: Who, queue: Queue, batch: PublishBatch) -> dict[str, Any]:
        payloads: list[bytes] = []
        for m in batch.messages:
            if m.encoding == "base64":
                try:
                    payloads.append(base64.b64decode(m.payload, validate=True))
                except binascii.Error:
                    raise ApiError(ErrorCode.BAD_REQUEST, "a payload is not valid base64") from None
            elif m.encoding == "utf-8":
                payloads.append(m.payload.encode())
            else:
                raise ApiError(ErrorCode.BAD_REQUEST, "encoding must be utf-8 or base64")
        if not payloads:
            return {"ids": []}
        headers = [m.headers for m in batch.messages]
        fields: dict[str, Any] = {"queue": queue, "payloads": payloads}
        if any(headers):
            fields["headers"] = headers
        reply = await ops.call(p, "publish", **fields)
        return {"ids": list(range(reply["first_id"], reply["first_id"] + reply["count"]))}

    @app.post(
        "/api/queues/{queue}/fetch",
        tags=["messages"],
        summary="Lease up to max ready messages; ack or nack them with their id and lease",
    )
    async def fetch(
        p: Who,
        queue: Queue,
        max: Annotated[int, Query(ge=1)] = 1,
        wait: Annotated[float, Query(ge=0, le=MAX_HTTP_WAIT)] = 0.0,
        lease: Annotated[float, Query(gt=0)] = 30.0,
    ) -> dict[str, Any]:
        reply = await ops.call(p, "fetch", queue=queue, max=max, wait=wait, lease=lease)
        return {"messages": [message_json(queue, m, leased=True) for m in reply["msgs"]]}

    async def settle(p: Principal, op: str, queue: str, body: Settle, **extra: Any) -> dict[str, Any]:
        if not body.leases:
            raise ApiError(ErrorCode.BAD_REQUEST, "leases must be a non-empty list of [id, lease] pairs")
        pairs = [list(pair) for pair in body.leases]
        reply = await ops.call(p, op, queue=queue, leases=pairs, **extra)
        return {"failed": {str(k): v for k, v in reply["failed"].items()}}

    @app.post("/api/queues/{queue}/ack", tags=["messages"], summary="Delete processed messages")
    async def ack(p: Who, queue: Queue, body: Settle) -> dict[str, Any]:
        return await settle(p, "ack", queue, body)

    @app.post("/api/queues/{queue}/nack", tags=["messages"], summary="Make messages ready again (after delay s)")
    async def nack(p: Who, queue: Queue, body: Annotated[Settle, Body()]) -> dict[str, Any]:
        return await settle(p, "nack", queue, body, delay=body.delay or 0.0)

    # ------------------------------------------------------------------------------------------- live feed
    @app.get(
        "/api/events",
        tags=["broker"],
        summary="Server-sent events: a 'history' event, then a 'sample' event per second (queues, info)",
    )
    async def events(p: Who, request: Request) -> StreamingResponse:
        feed = sampler.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            nonlocal p  # replaced by its successor when the auth file is reloaded
            try:
                history = {q: list(h) for q, h in sampler.history.items() if p.may_see(q)}
                yield _sse("history", {"history": history, "info": ops.info()})
                if sampler.latest:
                    yield _sse("sample", _visible_event(p, sampler, ops))
                while True:
                    event = await feed.get()
                    if event is None:
                        return
                    if server.auth is not None:  # an auth reload applies to open feeds too
                        successor = server.auth.successor(p)
                        if successor is None:
                            yield _sse("revoked", {"code": "UNAUTHORIZED", "message": "the token was revoked"})
                            return
                        p = successor
                    yield _sse("sample", {**event, "queues": visible(p, event["queues"])})
            finally:
                sampler.unsubscribe(feed)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------------------------------------- API docs
    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Replika admin API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in _DOCS_ASSETS:
            return _error(ApiError(ErrorCode.NOT_FOUND, f"no asset {name!r}"))
        return FileResponse(str(swagger_ui_path / name), media_type=_DOCS_ASSETS[name])

    # ------------------------------------------------------------------------------------------- graphql, dashboard
    app.include_router(graphql_router(server, ops, sampler, principal), prefix="/graphql")

    static = importlib.resources.files("replika_server.admin") / "static"

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        path = static / name
        if name not in _ASSETS or not path.is_file():
            return _error(ApiError(ErrorCode.NOT_FOUND, f"no asset {name!r}"))
        return FileResponse(str(path), media_type=_ASSETS[name])

    return app


#: Paths that need a token when the broker runs with --auth (health checks, docs and the dashboard's files do not).
_GUARDED = ("/api", "/graphql", "/metrics")


def _authenticate(server: "Server", request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    token: str | None = header[7:] if header[:7].lower() == "bearer " else request.query_params.get("token")
    found = server.authenticate(token)
    if found is None:
        message = "a token is required (Authorization: Bearer ...)" if token is None else "unknown token"
        raise ApiError(ErrorCode.UNAUTHORIZED, message)
    return found


_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}


def _visible_event(p: Principal, sampler: Sampler, ops: Ops) -> dict[str, Any]:
    rows = list(sampler.latest.values())
    if not p.admin:
        rows = [r for r in rows if p.may_see(r["queue"])]
    return {"t": sampler.sampled_at, "info": ops.info(), "queues": rows}


def _hostname(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8333" -> "[::1]")."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)
