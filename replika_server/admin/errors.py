"""Errors of the admin API: :class:`ApiError` (a wire code, an HTTP status, a message), the exception handlers that
give every refusal one JSON shape, and the OpenAPI descriptions of those refusals per route.

Every error body is ``{"code": ..., "message": ...}`` with the protocol's stable code, plus extra fields where the
code has some (``retry_after`` for ``RATE_LIMITED``). FastAPI's own request validation keeps its 422 and its
``detail`` list, as the schema says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Route, compile_path

from replika_protocol import ErrorCode, Frame

__all__ = ["STATUS", "ApiError", "ErrorBody", "allow_table", "errors", "install_handlers"]

#: HTTP status per wire error code.
STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.STALE_LEASE: 409,
    ErrorCode.TOO_MANY_QUEUES: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.BATCH_TOO_LARGE: 413,
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUEUE_FULL: 507,
    ErrorCode.STORE_FULL: 507,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.STORE_FAILED: 503,
}

#: Each route's path pattern and the methods it takes.
AllowTable = list[tuple[re.Pattern[str], frozenset[str]]]

#: The code of an error the web framework raises itself (a malformed JSON body, an unknown path).
_FRAMEWORK_CODES = {400: ErrorCode.BAD_REQUEST, 404: ErrorCode.NOT_FOUND, 413: ErrorCode.PAYLOAD_TOO_LARGE}


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ErrorBody(BaseModel):
    """The body of every refusal but FastAPI's request validation (422)."""

    model_config = ConfigDict(extra="allow")

    code: ErrorCode = Field(description="the protocol's stable error code (SPEC.md, Errors)")
    message: str = Field(description="what went wrong, for a person")


#: What each status means on the routes that document it.
_MEANINGS = {
    400: "BAD_REQUEST: a field is not valid (a queue name, a number out of range, a body that is not JSON, ...)",
    401: "UNAUTHORIZED: with --auth, no token or an unknown one",
    403: "FORBIDDEN: the token may not do this, or a foreign Host or Origin (DNS rebinding, CORS)",
    404: "NOT_FOUND: no such queue",
    409: "TOO_MANY_QUEUES: the broker holds its most queues already",
    413: "PAYLOAD_TOO_LARGE or BATCH_TOO_LARGE: over --max-frame, --max-payload or --max-batch",
    429: "RATE_LIMITED: the token is over its publish rate; retry_after says in how many seconds",
    503: "SHUTTING_DOWN or STORE_FAILED: the broker is stopping, or its store failed (it exits 74 and restarts)",
    507: "QUEUE_FULL or STORE_FULL: a queue's or the store's size limit",
}


def errors(*statuses: int, **meanings: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that may refuse with ``statuses``; ``meanings`` overrides what a
    status means on it (keyed ``s409`` for 409)."""
    return {
        status: {"model": ErrorBody, "description": meanings.get(f"s{status}", _MEANINGS[status])}
        for status in statuses
    }


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Refusals raised by Starlette and FastAPI themselves, in the API's error shape. A 405's ``Allow`` lists every
    method of the path: Starlette would name only those of the first route of the path it tried."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(sorted(_methods(request)))
    code = _FRAMEWORK_CODES.get(exc.status_code)
    if code is None:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
    return JSONResponse({"code": code.value, "message": str(exc.detail)}, status_code=exc.status_code, headers=headers)


def _methods(request: Request) -> set[str]:
    path = request.url.path
    table: AllowTable = request.app.state.allow
    return {method for pattern, methods in table if pattern.match(path) for method in methods}


def allow_table(app: FastAPI, included: Iterable[tuple[APIRouter, str]]) -> AllowTable:
    """Each route's path pattern and methods, for ``Allow``: the app's own routes, and those of the routers it
    ``included`` with their prefixes (recent FastAPI keeps an included router whole in ``app.routes``)."""
    table = [(r.path_regex, frozenset(r.methods)) for r in app.router.routes if isinstance(r, Route) and r.methods]
    for router, prefix in included:
        for route in router.routes:
            if isinstance(route, Route) and route.methods:
                table.append((compile_path(prefix + route.path)[0], frozenset(route.methods)))
    return table


def install_handlers(app: FastAPI) -> None:
    """Give ``app`` the API's error shape for :class:`ApiError` and the framework's own refusals."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
