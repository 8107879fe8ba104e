"""The admin sidecar's HTTP application: JSON admin API (OpenAPI docs at ``/docs``), ``/metrics``, health checks,
the live feed, the dashboard's files and GraphQL, one router per concern:

=================  =====================================================================
``health``         ``/healthz``, ``/readyz``, ``/metrics``
``queues``         ``/api/info``, ``/api/queues...``: counts, peek, dead letters, purge, delete, redrive
``messages``       ``/api/queues/{queue}/...``: publish, fetch, ack, nack, reject, touch
``events``         ``/api/events``, the live feed (server-sent events)
``graphql``        ``/graphql``
``pages``          ``/``, ``/static/...``, ``/docs``
=================  =====================================================================

Authentication: when the broker runs with ``--auth``, every ``/api``, ``/graphql`` and ``/metrics`` request needs a
token (``Authorization: Bearer <token>``, or ``?token=`` where a browser cannot set headers, as for
``EventSource``), with the same permissions as over TCP. Browsers calling from another origin are refused unless
listed with ``--admin-cors-origin``; on a loopback address, requests must also name a loopback host, which stops
DNS-rebinding pages from reaching the API through the user's browser (:class:`~replika_server.admin.guard.Guard`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from replika_server.admin import events, health, messages, pages, queues
from replika_server.admin.deps import GUARDED
from replika_server.admin.errors import allow_table, install_handlers
from replika_server.admin.graphql import graphql_router
from replika_server.admin.guard import Guard
from replika_server.admin.ops import Ops
from replika_server.admin.sampler import Sampler

__all__ = ["create_app"]

_DESCRIPTION = (
    "Queues, messages and the broker's state, over HTTP. With `--auth`, send `Authorization: Bearer "
    "<token>`; permissions are those of the TCP protocol (SPEC.md). Errors carry the protocol's stable "
    "`code`. Payloads are UTF-8 text, or base64 as `encoding` says."
)


def create_app(ops: Ops, sampler: Sampler) -> FastAPI:
    """The sidecar's application over ``ops`` (the broker) and ``sampler`` (its once-a-second stats)."""
    config = ops.config
    app = FastAPI(
        title="Replika admin API",
        version=ops.version,
        description=_DESCRIPTION,
        docs_url=None,  # served by the pages router from swagger-ui-bundle's files: no internet access needed
        redoc_url=None,
    )
    app.state.ops, app.state.sampler = ops, sampler
    app.middleware("http")(Guard(config))
    if config.admin_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(config.admin_cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    install_handlers(app)
    included = [(r, "") for r in (health.router, queues.router, messages.router, events.router)]
    included += [(graphql_router(), "/graphql"), (pages.router, "")]
    for router, prefix in included:
        app.include_router(router, prefix=prefix)
    app.state.allow = allow_table(app, included)
    app.openapi = lambda: _openapi(app, auth=config.auth is not None)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, *, auth: bool) -> dict[str, Any]:
    """FastAPI's document, plus, with ``--auth``, the token every guarded path needs."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if auth:
            _require_token(doc)
        app.openapi_schema = doc
    return app.openapi_schema


def _require_token(doc: dict[str, Any]) -> None:
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "a token of the --auth file"},
        "token": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "the same, where a browser cannot set a header (EventSource)",
        },
    }
    for path, operations in doc["paths"].items():
        if path.startswith(GUARDED):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"token": []}]
