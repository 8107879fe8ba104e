"""The binary protocol's reply maps (SPEC.md §5): a store op's typed result turned into the fields of its reply.

Only the wire's own shapes live here; ``id`` and ``ok`` are added by whoever sends the reply. The text protocol
and the HTTP APIs build their own output from these maps, so that every front end reports the same facts.
"""

from __future__ import annotations

from typing import cast

from replika_protocol import ErrorCode, Frame
from replika_server.store import (
    Ack,
    Bind,
    Declare,
    DeleteQueue,
    Delivery,
    Fetch,
    History,
    HistoryList,
    MessageHistory,
    Nack,
    Op,
    Peek,
    Peeked,
    Publish,
    Published,
    PublishTopic,
    Purge,
    QueueStats,
    Redrive,
    Reject,
    Result,
    Settled,
    Stats,
    Touch,
    Unbind,
)

__all__ = ["publish_reply", "reply_frame", "settle_reply"]

_STALE = ErrorCode.STALE_LEASE.value


def reply_frame(op: Op, result: Result) -> Frame:
    """The reply fields of ``op`` whose result is ``result``."""
    # The common ops first: this runs once per request.
    if type(op) is Fetch:
        return {"msgs": cast(list[Delivery], result)}
    if type(op) is Publish:
        assert isinstance(result, Published)
        return publish_reply(result)
    if isinstance(op, Ack | Nack | Reject | Touch):
        return settle_reply(cast(Settled, result))
    if isinstance(op, Stats):
        stats = [s.as_dict() for s in cast(list[QueueStats], result)]
        return {"queues": stats} if op.queue is None else {"stats": stats[0]}
    if isinstance(op, PublishTopic):
        return {"ids": cast("dict[str, list[int]]", result)}
    if isinstance(op, Purge | Redrive):
        return {"purged" if isinstance(op, Purge) else "moved": result}
    if isinstance(op, Peek):
        return {"msgs": cast(list[Peeked], result)}
    if isinstance(op, Declare | DeleteQueue | Bind | Unbind):
        return {}
    if isinstance(op, History):
        return {"message": cast(MessageHistory, result).as_dict()}
    if isinstance(op, HistoryList):
        return {"messages": [m.as_dict() for m in cast(list[MessageHistory], result)]}
    raise TypeError(f"no reply for {type(op).__name__}")


def publish_reply(result: Published) -> Frame:
    reply: Frame = {"first_id": result.first_id, "count": result.count}
    if result.ids is not None:  # the request had dedup_ids: one id per payload, an earlier message's for a repeat
        reply["ids"] = result.ids
    return reply


def settle_reply(result: Settled) -> Frame:
    if not result:
        return {"failed": result}
    return {"failed": dict.fromkeys(result, _STALE), "reasons": result}
