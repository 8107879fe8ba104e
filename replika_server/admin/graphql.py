"""GraphQL at ``/graphql`` (Strawberry): queues, stats and peeked messages as queries; purge and redrive as
mutations. Every field goes through the same operations, and so the same authorization, as the JSON API."""

from __future__ import annotations

import json
from typing import Any

import strawberry
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.types import Info as ResolveInfo

from replika_protocol import ErrorCode
from replika_server.admin.deps import principal, visible
from replika_server.admin.errors import ApiError
from replika_server.admin.graphql_docs import document
from replika_server.admin.graphql_types import (
    BrokerInfo,
    Message,
    MessageHistory,
    Queue,
)
from replika_server.admin.graphql_types import history as _history
from replika_server.admin.graphql_types import message as _message
from replika_server.admin.graphql_types import queue as _queue
from replika_server.admin.ops import Ops, message_json
from replika_server.admin.sampler import Sampler
from replika_server.auth import Principal

__all__ = ["graphql_router"]


class _Context(BaseContext):
    """What every resolver gets: the caller's principal and the broker's operations."""

    def __init__(self, principal: Principal, ops: Ops, sampler: Sampler) -> None:
        super().__init__()
        self.principal = principal
        self.ops = ops
        self.sampler = sampler


def _ctx(info: ResolveInfo[Any, Any]) -> _Context:
    ctx: _Context = info.context
    return ctx


async def _row(ctx: _Context, name: str) -> dict[str, Any]:
    reply = await ctx.ops.call(ctx.principal, "stats", queue=name)
    [row] = visible(ctx.principal, [ctx.sampler.overlay(reply["stats"])])
    return row


async def _peek(ctx: _Context, name: str, max: int) -> list[Message]:
    reply = await ctx.ops.call(ctx.principal, "peek", queue=name, max=max)
    return [_message(message_json(name, m, leased=False)) for m in reply["msgs"]]


@strawberry.type
class Query:
    @strawberry.field(description="The broker: version, uptime, connections, store, durability")
    def info(self, info: ResolveInfo[Any, Any]) -> BrokerInfo:
        data = _ctx(info).ops.info()
        return BrokerInfo(**{k: data[k] for k in BrokerInfo.__annotations__})

    @strawberry.field(description="Every queue the token may see, with counts and rates")
    async def queues(self, info: ResolveInfo[Any, Any]) -> list[Queue]:
        ctx = _ctx(info)
        # A listing is never refused, only filtered, as the REST one.
        return [_queue(r) for r in visible(ctx.principal, await ctx.sampler.current())]

    @strawberry.field(description="One queue")
    async def queue(self, info: ResolveInfo[Any, Any], name: str) -> Queue:
        return _queue(await _row(_ctx(info), name))

    @strawberry.field(description="Ready messages of a queue, read without leasing them")
    async def peek(self, info: ResolveInfo[Any, Any], queue: str, max: int = 20) -> list[Message]:
        return await _peek(_ctx(info), queue, max)

    @strawberry.field(description="One message's recorded history (a queue declared with history)")
    async def message_history(self, info: ResolveInfo[Any, Any], queue: str, id: int) -> MessageHistory:
        ctx = _ctx(info)
        reply = await ctx.ops.call(ctx.principal, "history", queue=queue, message_id=id)
        return _history(reply["message"])

    @strawberry.field(description="Messages with a recorded history, newest first")
    async def history(
        self, info: ResolveInfo[Any, Any], queue: str, state: str | None = None, max: int = 100
    ) -> list[MessageHistory]:
        ctx = _ctx(info)
        reply = await ctx.ops.call(ctx.principal, "history", queue=queue, state=state, max=max)
        return [_history(m) for m in reply["messages"]]

    @strawberry.field(description="Messages in a queue's dead-letter queue, read without leasing them")
    async def dead_letters(self, info: ResolveInfo[Any, Any], queue: str, max: int = 20) -> list[Message]:
        ctx = _ctx(info)
        row = await _row(ctx, queue)
        return await _peek(ctx, row["dead_letter"], max)


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Delete every message of the queue that is not leased; how many")
    async def purge(self, info: ResolveInfo[Any, Any], queue: str) -> int:
        ctx = _ctx(info)
        return int((await ctx.ops.call(ctx.principal, "purge", queue=queue))["purged"])

    @strawberry.mutation(description="Move the queue's dead-lettered messages back where they came from; how many")
    async def redrive(self, info: ResolveInfo[Any, Any], queue: str, max: int | None = None) -> int:
        ctx = _ctx(info)
        row = await _row(ctx, queue)
        reply = await ctx.ops.call(ctx.principal, "redrive", queue=row["dead_letter"], max=max)
        return int(reply["moved"])


async def _context(request: Request, p: Principal = Depends(principal)) -> _Context:  # noqa: B008
    if request.method == "POST" and "json" in request.headers.get("content-type", ""):
        await _check_body(request)
    return _Context(p, request.app.state.ops, request.app.state.sampler)


async def _check_body(request: Request) -> None:
    """Strawberry answers a body that is not UTF-8, or JSON that is a string, a number, true or null, with a 500
    (it calls .get() on it): refuse those first. The body stays cached on the request for Strawberry to read."""
    try:
        body = json.loads(await request.body())
    except ValueError:  # not JSON, or not even UTF-8 (which Strawberry let through as a 500 too)
        raise ApiError(ErrorCode.BAD_REQUEST, "the request body is not JSON") from None
    if not isinstance(body, dict | list):
        raise ApiError(ErrorCode.BAD_REQUEST, 'a GraphQL request is a JSON object: {"query": "..."}')


def graphql_router() -> GraphQLRouter[Any, Any]:
    """GraphQL on ``""`` (mounted at ``/graphql``): POST a query, or GET one as ``?query=``; a GET without one,
    from a browser, is the GraphiQL page."""
    router: GraphQLRouter[Any, Any] = GraphQLRouter(
        strawberry.Schema(query=Query, mutation=Mutation), context_getter=_context
    )
    for route in router.routes:
        if isinstance(route, APIRoute):
            document(route)
    return router
