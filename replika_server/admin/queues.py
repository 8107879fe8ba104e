"""The admin API's reads and housekeeping: broker info, queues with their counts and rates, peeking, dead
letters, purge, delete and redrive."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from replika_protocol import ErrorCode
from replika_server.admin.deps import OpsDep, Queue, SamplerDep, Who, queue_row, visible
from replika_server.admin.errors import ApiError, errors
from replika_server.admin.ops import history_json, message_json

__all__ = ["router"]

router = APIRouter(prefix="/api")

#: How a read of the broker's state may be refused.
_READ = errors(401, 403, 503)
#: How a request naming a queue may be refused.
_QUEUE = errors(400, 401, 403, 404, 503)
#: How a POST naming a queue may be refused (its body is bounded too, even where it has none).
_QUEUE_POST = errors(400, 401, 403, 404, 413, 503)
#: A message's final state, as the history op takes it.
_STATES = "^(waiting|in_flight|acked|dead_lettered|redriven|expired|dropped|purged)$"
#: The most messages one peek shows.
MAX_PEEK = 1000


@router.get("/info", tags=["broker"], summary="Version, uptime, connections, store size, durability", responses=_READ)
async def info(p: Who, ops: OpsDep) -> dict[str, Any]:
    return ops.info()


@router.get("/queues", tags=["queues"], summary="Every queue with its counts and rates", responses=_READ)
async def queues(p: Who, sampler: SamplerDep) -> dict[str, Any]:
    return {"queues": visible(p, await sampler.current()), "sampled_at": sampler.sampled_at}


@router.get("/queues/{queue}", tags=["queues"], summary="One queue: counts, options, rates, history", responses=_QUEUE)
async def queue(p: Who, queue: Queue, ops: OpsDep, sampler: SamplerDep) -> dict[str, Any]:
    row = await queue_row(ops, sampler, p, queue)
    row["history"] = list(sampler.history.get(queue, ()))
    return row


@router.get(
    "/queues/{queue}/messages", tags=["messages"], summary="Peek at ready messages (no lease)", responses=_QUEUE
)
async def peek(p: Who, queue: Queue, ops: OpsDep, max: Annotated[int, Query(ge=1, le=MAX_PEEK)] = 20) -> dict[str, Any]:
    reply = await ops.call(p, "peek", queue=queue, max=max)
    return {"messages": [message_json(queue, m, leased=False) for m in reply["msgs"]]}


@router.get(
    "/queues/{queue}/messages/{message_id}",
    tags=["messages"],
    summary="One message's recorded history: its headers, kept payload and events, oldest first",
    responses=_QUEUE,
)
async def message_history(
    p: Who, queue: Queue, ops: OpsDep, message_id: Annotated[int, Path(ge=1, le=2**63)]
) -> dict[str, Any]:
    reply = await ops.call(p, "history", queue=queue, message_id=message_id)
    return history_json(reply["message"])


@router.get(
    "/queues/{queue}/history",
    tags=["messages"],
    summary="Messages with a recorded history, newest first, by final state, publish time and header",
    responses=_QUEUE,
)
async def history(
    p: Who,
    queue: Queue,
    ops: OpsDep,
    state: Annotated[str | None, Query(pattern=_STATES)] = None,
    since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
    until: Annotated[float | None, Query(ge=0, le=1e11)] = None,
    header: Annotated[str | None, Query(pattern="^[^=]+=.*$", max_length=4096)] = None,
    max: Annotated[int, Query(ge=1, le=MAX_PEEK)] = 100,
) -> dict[str, Any]:
    pair = header.split("=", 1) if header is not None else None
    reply = await ops.call(p, "history", queue=queue, state=state, since=since, until=until, header=pair, max=max)
    return {"messages": [history_json(m) for m in reply["messages"]]}


@router.get(
    "/queues/{queue}/dead-letters",
    tags=["messages"],
    summary="Peek at the messages in this queue's dead-letter queue",
    responses=_QUEUE,
)
async def dead_letters(
    p: Who, queue: Queue, ops: OpsDep, sampler: SamplerDep, max: Annotated[int, Query(ge=1, le=MAX_PEEK)] = 20
) -> dict[str, Any]:
    dlq = (await queue_row(ops, sampler, p, queue))["dead_letter"]
    try:
        reply = await ops.call(p, "peek", queue=dlq, max=max)
    except ApiError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        return {"dead_letter": dlq, "messages": []}
    return {"dead_letter": dlq, "messages": [message_json(dlq, m, leased=False) for m in reply["msgs"]]}


@router.post(
    "/queues/{queue}/purge", tags=["queues"], summary="Delete every message that is not leased", responses=_QUEUE_POST
)
async def purge(p: Who, queue: Queue, ops: OpsDep) -> dict[str, Any]:
    return {"purged": (await ops.call(p, "purge", queue=queue))["purged"]}


@router.delete("/queues/{queue}", tags=["queues"], summary="Delete the queue and its messages", responses=_QUEUE)
async def delete(p: Who, queue: Queue, ops: OpsDep) -> dict[str, Any]:
    await ops.call(p, "delete_queue", queue=queue)
    return {"deleted": queue}


@router.post(
    "/queues/{queue}/redrive",
    tags=["queues"],
    summary="Move this queue's dead-lettered messages back to the queues they came from",
    responses=_QUEUE_POST,
)
async def redrive(
    p: Who, queue: Queue, ops: OpsDep, sampler: SamplerDep, max: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    dlq = (await queue_row(ops, sampler, p, queue))["dead_letter"]
    try:
        # What is there now, and no more: a consumer that rejects at once must not keep this going for ever.
        budget = (await ops.call(p, "stats", queue=dlq))["stats"]["total"] if max is None else max
    except ApiError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        return {"moved": 0, "dead_letter": dlq}
    moved = 0
    while moved < budget:
        reply = await ops.call(p, "redrive", queue=dlq, max=min(budget - moved, ops.config.max_batch))
        if not reply["moved"]:
            break
        moved += reply["moved"]
    return {"moved": moved, "dead_letter": dlq}
