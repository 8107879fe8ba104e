"""Replika's Python SDK.

``AsyncClient`` for asyncio code, ``Client`` for blocking code; the same methods on both::

    async with replika.AsyncClient("replika://127.0.0.1:8777") as client:
        await client.publish("jobs", b"hello")
        async for msg in client.consume("jobs"):
            await msg.ack()
"""

from replika._message import Message, MessageData, PeekedMessage, SyncMessage
from replika.aio import AsyncClient
from replika.errors import (
    BadRequest,
    BatchTooLarge,
    ConnectionLost,
    ConnectionRefusedByServer,
    Forbidden,
    InternalError,
    NotABroker,
    NotFound,
    PayloadTooLarge,
    ProtocolViolation,
    QueueFull,
    RateLimited,
    ReplikaError,
    ShuttingDown,
    StaleLease,
    StoreFailed,
    StoreFull,
    StoreUnavailable,
    TooManyQueues,
    Unauthorized,
    UnsupportedVersion,
)
from replika.sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "BatchTooLarge",
    "Client",
    "ConnectionLost",
    "ConnectionRefusedByServer",
    "Forbidden",
    "InternalError",
    "Message",
    "MessageData",
    "NotABroker",
    "NotFound",
    "PayloadTooLarge",
    "PeekedMessage",
    "ProtocolViolation",
    "QueueFull",
    "RateLimited",
    "ReplikaError",
    "ShuttingDown",
    "StaleLease",
    "StoreFailed",
    "StoreFull",
    "StoreUnavailable",
    "SyncMessage",
    "TooManyQueues",
    "Unauthorized",
    "UnsupportedVersion",
    "__version__",
]
