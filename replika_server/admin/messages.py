"""The admin API for scripts: publish, fetch and settle (ack, nack, reject, touch) over HTTP.

A settle answers 200 with ``{"failed": {}}`` when every lease was settled, 200 with the refused ones in
``failed`` (and why in ``reasons``) when some were, and 409 ``STALE_LEASE`` with the same two maps when none was,
so that a script that checks the status sees a settle that did nothing. Not 207 Multi-Status: that is WebDAV's,
with an XML body of its own, and a partly applied settle is a success to retry only in part.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from replika_protocol import ErrorCode, is_valid_queue_name
from replika_server.admin.deps import OpsDep, Queue, Who
from replika_server.admin.errors import ApiError, errors
from replika_server.admin.models import Leases, NothingSettled, PublishBatch, Settle, SettleReply, Touch
from replika_server.admin.ops import Ops, message_json
from replika_server.admin.seam import MAX_LEASE
from replika_server.auth import Principal

__all__ = ["MAX_HTTP_WAIT", "router"]

#: Longest an HTTP fetch may long-poll: an HTTP client or proxy in between rarely waits longer.
MAX_HTTP_WAIT = 60.0

router = APIRouter(prefix="/api/queues/{queue}", tags=["messages"])

_PUBLISH = errors(400, 401, 403, 409, 413, 429, 503, 507)
_FETCH = errors(400, 401, 403, 404, 413, 503)
_SETTLE = {
    **errors(400, 401, 403, 404, 413, 503),
    409: {"model": NothingSettled, "description": "STALE_LEASE: no lease was settled (failed and reasons say why)"},
}
_RAW_BODY = {
    "requestBody": {
        "description": "the message, as is (up to --max-payload bytes)",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


@router.post(
    "/publish",
    summary="Publish the request body as one message (as NSQ's /pub: curl -d 'hello' .../publish)",
    responses=_PUBLISH,
    openapi_extra=_RAW_BODY,
)
async def publish(p: Who, queue: Queue, ops: OpsDep, request: Request) -> dict[str, Any]:
    body = await request.body()
    reply = await ops.call(p, "publish", queue=queue, payloads=[body])
    return {"id": reply["first_id"]}


@router.post("/publish-batch", summary="Publish many messages (JSON)", responses=_PUBLISH)
async def publish_batch(p: Who, queue: Queue, ops: OpsDep, batch: PublishBatch) -> dict[str, Any]:
    payloads = [_payload(m.payload, m.encoding) for m in batch.messages]
    headers = [_headers(m.headers) for m in batch.messages]
    if not payloads:
        _may_publish(p, queue)  # nothing to store, but a request the broker would refuse is refused
        return {"ids": []}
    fields: dict[str, Any] = {"queue": queue, "payloads": payloads}
    if any(headers):
        fields["headers"] = headers
    reply = await ops.call(p, "publish", **fields)
    return {"ids": list(range(reply["first_id"], reply["first_id"] + reply["count"]))}


def _payload(text: str, encoding: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:  # not base64, or not even ASCII
            raise ApiError(ErrorCode.BAD_REQUEST, "a payload is not valid base64") from None
    if encoding == "utf-8":
        return _utf8(text, "a payload").encode()
    raise ApiError(ErrorCode.BAD_REQUEST, "encoding must be utf-8 or base64")


def _headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    for key, value in (headers or {}).items():
        _utf8(key, "a header name")
        _utf8(value, "a header value")
    return headers


def _utf8(text: str, what: str) -> str:
    """``text``, if it has a UTF-8 form: JSON's escapes can spell a lone surrogate ("\\ud800"), msgpack cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ApiError(ErrorCode.BAD_REQUEST, f"{what} is not valid Unicode text (a lone surrogate)") from None
    return text


def _may_publish(p: Principal, queue: str) -> None:
    if not is_valid_queue_name(queue):
        raise ApiError(ErrorCode.BAD_REQUEST, "field 'queue' must be a queue name: 1-255 characters of [A-Za-z0-9._:-]")
    if not p.may_publish(queue):
        raise ApiError(ErrorCode.FORBIDDEN, f"token {p.name!r} may not publish to queue {queue!r}")


@router.post(
    "/fetch", summary="Lease up to max ready messages; ack or nack them with their id and lease", responses=_FETCH
)
async def fetch(
    p: Who,
    queue: Queue,
    ops: OpsDep,
    max: Annotated[int, Query(ge=1)] = 1,
    wait: Annotated[float, Query(ge=0, le=MAX_HTTP_WAIT)] = 0.0,
    lease: Annotated[float, Query(gt=0, json_schema_extra={"minimum": 0.001, "maximum": MAX_LEASE})] = 30.0,
) -> dict[str, Any]:
    # The broker lowers max to --max-batch too, but refuses one past 64 bits: here any count means "all you can".
    reply = await ops.call(p, "fetch", queue=queue, max=min(max, ops.config.max_batch), wait=wait, lease=lease)
    return {"messages": [message_json(queue, m, leased=True) for m in reply["msgs"]]}


_SETTLED: dict[str, Any] = {"response_model": SettleReply, "response_model_exclude_none": True, "responses": _SETTLE}


@router.post("/ack", summary="Delete processed messages", **_SETTLED)
async def ack(p: Who, queue: Queue, ops: OpsDep, body: Settle) -> Response | dict[str, Any]:
    return await _settle(ops, p, "ack", queue, body)


@router.post("/nack", summary="Make messages ready again (after delay s)", **_SETTLED)
async def nack(p: Who, queue: Queue, ops: OpsDep, body: Settle) -> Response | dict[str, Any]:
    return await _settle(ops, p, "nack", queue, body, delay=body.delay or 0.0)


@router.post("/reject", summary="Dead-letter messages now, whatever their attempts", **_SETTLED)
async def reject(p: Who, queue: Queue, ops: OpsDep, body: Leases) -> Response | dict[str, Any]:
    return await _settle(ops, p, "reject", queue, body)


@router.post("/touch", summary="Extend leases: each ends lease s from now", **_SETTLED)
async def touch(p: Who, queue: Queue, ops: OpsDep, body: Touch) -> Response | dict[str, Any]:
    return await _settle(ops, p, "touch", queue, body, lease=body.lease)


async def _settle(ops: Ops, p: Principal, op: str, queue: str, body: Leases, **extra: Any) -> Response | dict[str, Any]:
    # A repeated [id, lease] pair could only fail, or touch again: sent once, the reply's failed map (keyed by
    # id) says exactly which leases were refused.
    pairs = [list(pair) for pair in dict.fromkeys(body.leases)]
    if not pairs:
        raise ApiError(ErrorCode.BAD_REQUEST, "leases must be a non-empty list of [id, lease] pairs")
    reply = await ops.call(p, op, queue=queue, leases=pairs, **extra)
    if not reply["failed"]:
        return {"failed": {}}
    out = {
        "failed": {str(k): v for k, v in reply["failed"].items()},
        "reasons": {str(k): str(v) for k, v in reply.get("reasons", {}).items()},
    }
    if len(out["failed"]) < len(pairs):
        return out
    message = f"no lease was settled: {'the lease is' if len(pairs) == 1 else 'each lease is'} stale (see reasons)"
    return JSONResponse({"code": ErrorCode.STALE_LEASE.value, "message": message, **out}, status_code=409)
