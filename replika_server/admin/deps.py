"""What the admin routers share: their dependencies (the operations, the sampler, the caller's principal), the
queue-name path parameter, and the per-principal view of the sampler's rows."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request

from replika_protocol import ErrorCode
from replika_server.admin.errors import ApiError
from replika_server.admin.ops import Ops
from replika_server.admin.sampler import Sampler
from replika_server.auth import Principal

__all__ = ["GUARDED", "QUEUE_PATTERN", "OpsDep", "Queue", "SamplerDep", "Who", "authenticate", "queue_row", "visible"]

#: Paths that need a token when the broker runs with --auth (health checks, docs and the dashboard's files do not).
GUARDED = ("/api", "/graphql", "/metrics")

#: A queue name as the broker takes it (1-255 characters of [A-Za-z0-9._:-]), less "." and "..": HTTP clients
#: remove those as path segments (RFC 3986, 5.2.4), so no URL can name them. Validated by the broker (400
#: BAD_REQUEST), not by FastAPI, so a bad name gets the protocol's code.
QUEUE_PATTERN = (
    r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,254}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,253}|\.\.[A-Za-z0-9._:-]{1,253})$"
)

Queue = Annotated[
    str,
    Path(
        description="a queue name: 1-255 characters of [A-Za-z0-9._:-], not '.' or '..'",
        json_schema_extra={"pattern": QUEUE_PATTERN},
    ),
]


def _ops(request: Request) -> Ops:
    ops: Ops = request.app.state.ops
    return ops


def _sampler(request: Request) -> Sampler:
    sampler: Sampler = request.app.state.sampler
    return sampler


def authenticate(request: Request) -> Principal:
    """The caller's principal, from ``Authorization: Bearer`` or, where a browser cannot set it (EventSource),
    ``?token=``; or :class:`ApiError` UNAUTHORIZED."""
    header = request.headers.get("authorization", "")
    token: str | None = header[7:] if header[:7].lower() == "bearer " else request.query_params.get("token")
    found = _ops(request).authenticate(token)
    if found is None:
        message = "a token is required (Authorization: Bearer ...)" if token is None else "unknown token"
        raise ApiError(ErrorCode.UNAUTHORIZED, message)
    return found


def principal(request: Request) -> Principal:
    """The dependency of every guarded route: the principal the guard found, or found now."""
    found: Principal | None = getattr(request.state, "principal", None)
    return found if found is not None else authenticate(request)


OpsDep = Annotated[Ops, Depends(_ops)]
SamplerDep = Annotated[Sampler, Depends(_sampler)]
Who = Annotated[Principal, Depends(principal)]


def visible(p: Principal, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sampler's ``rows`` that ``p`` may see."""
    if p.admin:
        return rows
    # A dead-letter queue the token may not see is not counted for it either.
    return [r if p.may_see(r["dead_letter"]) else {**r, "dead": None} for r in rows if p.may_see(r["queue"])]


async def queue_row(ops: Ops, sampler: Sampler, p: Principal, queue: str) -> dict[str, Any]:
    """One queue's row, as in a listing: its current stats, rates from the latest sample (see Sampler.overlay)."""
    reply = await ops.call(p, "stats", queue=queue)  # authorizes, and says NOT_FOUND for a missing queue
    [row] = visible(p, [sampler.overlay(reply["stats"])])
    return row
