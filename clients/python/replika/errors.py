"""Errors raised by the SDK. Every one is a :class:`ReplikaError` carrying the wire ``code``."""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "BatchTooLarge",
    "ConnectionLost",
    "ConnectionRefusedByServer",
    "Forbidden",
    "InternalError",
    "NotABroker",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolViolation",
    "QueueFull",
    "RateLimited",
    "ReplikaError",
    "ShuttingDown",
    "StaleLease",
    "StoreFailed",
    "StoreFull",
    "StoreUnavailable",
    "TooManyQueues",
    "Unauthorized",
    "UnsupportedVersion",
    "error_from_reply",
]


class ReplikaError(Exception):
    """Base of every SDK error. ``code`` is the stable wire error code; ``retriable`` says whether trying the
    same call again later can succeed."""

    code: str = "INTERNAL"
    retriable: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type[ReplikaError]]] = {}

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __init_subclass__(cls, codes: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for code in codes:
            ReplikaError._registry[code] = cls
        if codes:
            cls.code = codes[0]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionLost(ReplikaError, codes=("CONNECTION_LOST",)):
    """The connection to the broker failed or closed. Requests in flight may or may not have been applied."""

    retriable = True


class ConnectionRefusedByServer(ConnectionLost, codes=("TOO_MANY_CONNECTIONS", "IDLE_TIMEOUT", "HANDSHAKE_TIMEOUT")):
    """The broker closed the connection on purpose: it is at its connection limit (``TOO_MANY_CONNECTIONS``),
    or the connection was idle (``IDLE_TIMEOUT``) or slow to handshake (``HANDSHAKE_TIMEOUT``). Retriable."""


class ProtocolViolation(ReplikaError, codes=("BAD_FRAME", "FRAME_TOO_LARGE", "UNKNOWN_OP")):
    """One side broke the wire protocol (a bug, or a server of another version)."""


class NotABroker(ProtocolViolation, codes=("NOT_A_BROKER",)):
    """The server is not a Replika broker: it answered in HTTP, as the broker's admin sidecar (port 8333 by
    default) does. The message names the broker's default port. A client-side code: no broker sends it."""


class UnsupportedVersion(ReplikaError, codes=("UNSUPPORTED_VERSION",)):
    """The server speaks no protocol version this SDK speaks."""


class BadRequest(ReplikaError, codes=("BAD_REQUEST",)):
    """A field was missing, of the wrong type or out of range (e.g. a bad queue name)."""


class BatchTooLarge(BadRequest, codes=("BATCH_TOO_LARGE",)):
    """A request carried more messages or leases than the server's ``max_batch`` (the SDK splits its own)."""


class PayloadTooLarge(ReplikaError, codes=("PAYLOAD_TOO_LARGE",)):
    """A payload exceeds the server's ``max_payload``."""


class NotFound(ReplikaError, codes=("NOT_FOUND",)):
    """The queue does not exist."""


class Unauthorized(ReplikaError, codes=("UNAUTHORIZED",)):
    """The token is missing or wrong."""


class Forbidden(ReplikaError, codes=("FORBIDDEN",)):
    """The token may not do this to this queue."""


class StaleLease(ReplikaError, codes=("STALE_LEASE",)):
    """A lease token is no longer current: the message was delivered again since, or already settled.

    ``failed`` maps each refused message id to its code; the other messages of the same call were applied.
    ``reasons`` maps the same ids to why (SPEC.md §5): ``gone`` (no longer in the queue: acked, or moved),
    ``redelivered`` (delivered again since), ``settled`` (already nacked with this token) or ``unknown``
    (a token never issued for the message).
    """

    def __init__(
        self,
        message: str,
        code: str | None = None,
        failed: dict[int, str] | None = None,
        reasons: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message, code)
        self.failed: dict[int, str] = failed or {}
        self.reasons: dict[int, str] = reasons or {}


class QueueFull(ReplikaError, codes=("QUEUE_FULL",)):
    """The queue is at its length or byte limit."""

    retriable = True


class TooManyQueues(ReplikaError, codes=("TOO_MANY_QUEUES",)):
    """Creating the queue would pass the broker's ``max_queues``."""


class StoreFull(ReplikaError, codes=("STORE_FULL",)):
    """The broker's store cannot take more data until consumers drain it."""

    retriable = True


class StoreFailed(ReplikaError, codes=("STORE_FAILED",)):
    """The broker's store failed a write or fsync: this request was not applied, or not durably, and the broker
    refuses every write until it restarts (it exits to be restarted). Retriable against the restarted broker."""

    retriable = True


class StoreUnavailable(ReplikaError, codes=("STORE_UNAVAILABLE",)):
    """The broker could not reach its database (PostgreSQL engine: the primary went away, a network cut) or kept
    conflicting with other brokers: this request was not confirmed (it may have applied if the commit was cut
    off). The broker reconnects by itself; retry."""

    retriable = True


class RateLimited(ReplikaError, codes=("RATE_LIMITED",)):
    """The token is over its publish rate; nothing was stored. ``retry_after`` is how many seconds to wait."""

    retriable = True

    def __init__(self, message: str, code: str | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class ShuttingDown(ReplikaError, codes=("SHUTTING_DOWN",)):
    """The broker is stopping; retry against it once it is back."""

    retriable = True


class InternalError(ReplikaError, codes=("INTERNAL",)):
    """The broker failed in a way that is not the client's fault."""

    retriable = True


def error_from_reply(reply: dict[str, Any]) -> ReplikaError:
    """The exception for an error reply ``{"ok": false, "code": ..., "message": ...}``."""
    code = str(reply.get("code", "INTERNAL"))
    cls = ReplikaError._registry.get(code, ReplikaError)
    message = str(reply.get("message", ""))
    if cls is RateLimited:
        retry_after = reply.get("retry_after")
        return RateLimited(message, code, float(retry_after) if isinstance(retry_after, int | float) else 0.0)
    return cls(message, code)
