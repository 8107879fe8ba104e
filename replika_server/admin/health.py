"""Probes and metrics: ``/healthz`` (the process answers), ``/readyz`` (the store answers) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from replika_protocol import ErrorCode
from replika_server.admin.deps import OpsDep, Who
from replika_server.admin.errors import ApiError, errors
from replika_server.admin.prometheus import CONTENT_TYPE

__all__ = ["router"]

#: Seconds /readyz waits for the store before it says unavailable.
READY_TIMEOUT = 5.0

router = APIRouter(tags=["health"])


class Unavailable(BaseModel):
    status: str = "unavailable"
    reason: str


@router.get("/healthz", summary="The process is up", responses=errors(403))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The broker accepts clients and its store answers",
    responses={**errors(403), 503: {"model": Unavailable, "description": "the store did not answer"}},
)
async def readyz(ops: OpsDep) -> Response:
    try:
        await asyncio.wait_for(ops.store_answers(), READY_TIMEOUT)
    except (ApiError, TimeoutError) as exc:
        return JSONResponse({"status": "unavailable", "reason": str(exc) or "store timeout"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses=errors(401, 403, 503, s403="FORBIDDEN: the token is not an admin token, or a foreign Host or Origin"),
)
async def metrics(p: Who, ops: OpsDep) -> Response:
    if not p.admin:
        raise ApiError(ErrorCode.FORBIDDEN, f"token {p.name!r} may not read the broker's metrics (needs admin)")
    return PlainTextResponse(await ops.metrics(), media_type=CONTENT_TYPE)
