"""The live feed, ``/api/events``: server-sent events, a ``history`` event, then a ``sample`` event per sample
(once a second), each filtered to what the caller's token may see, until the client goes or its token is revoked
(a ``revoked`` event)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from replika_server.admin.deps import OpsDep, SamplerDep, Who, visible
from replika_server.admin.errors import errors
from replika_server.admin.ops import Ops
from replika_server.admin.sampler import Sampler
from replika_server.auth import Principal

__all__ = ["EventStream", "router"]

router = APIRouter(prefix="/api", tags=["broker"])


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response (and so documented)."""

    media_type = "text/event-stream"


#: One event of the stream (OpenAPI 3.1 describes a text/event-stream by its events); data is JSON.
_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["history", "sample", "revoked"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


@router.get(
    "/events",
    summary="Server-sent events: a 'history' event, then a 'sample' event per second (queues, info)",
    response_class=EventStream,
    responses={
        200: {
            "description": "an endless event stream: 'history', then 'sample' events; 'revoked' ends it",
            "content": {"text/event-stream": {"schema": _EVENT}},
        },
        **errors(401, 403),
    },
)
async def events(p: Who, ops: OpsDep, sampler: SamplerDep) -> EventStream:
    return EventStream(_stream(p, ops, sampler), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(p: Principal, ops: Ops, sampler: Sampler) -> AsyncIterator[bytes]:
    feed = sampler.subscribe()
    try:
        history = {q: list(h) for q, h in sampler.history.items() if p.may_see(q)}
        yield _sse("history", {"history": history, "info": ops.info()})
        if sampler.latest:
            rows = list(sampler.latest.values())
            yield _sse("sample", {"t": sampler.sampled_at, "info": ops.info(), "queues": visible(p, rows)})
        while True:
            event = await feed.get()
            if event is None:
                return
            successor = ops.successor(p)  # an auth reload applies to open feeds too
            if successor is None:
                yield _sse("revoked", {"code": "UNAUTHORIZED", "message": "the token was revoked"})
                return
            p = successor
            yield _sse("sample", {**event, "queues": visible(p, event["queues"])})
    finally:
        sampler.unsubscribe(feed)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
