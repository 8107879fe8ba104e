"""Delivered messages. :class:`Message` (from :class:`AsyncClient`) settles with coroutines, :class:`SyncMessage`
(from the blocking :class:`Client`) with plain calls; both carry the same fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replika.aio import AsyncClient
    from replika.sync import Client

__all__ = ["Message", "MessageData", "PeekedMessage", "SyncMessage"]


class MessageData:
    """A delivered message's fields.

    ``id``: per-queue id; ``token``: this delivery's lease token; ``attempts``: deliveries so far (1 on the
    first); ``published_at``: unix seconds; ``headers``: str->str (dead-lettered messages carry
    ``replika-dead-letter-queue``, ``-reason``, ``-id`` and ``-attempts``).
    """

    __slots__ = ("_client", "attempts", "headers", "id", "payload", "published_at", "queue", "token")

    def __init__(self, queue: str, wire: list[Any], client: Any) -> None:
        self.queue = queue
        self.id: int = wire[0]
        self.token: int = wire[1]
        self.attempts: int = wire[2]
        self.published_at: float = wire[3]
        self.payload: bytes = wire[4]
        self.headers: dict[str, str] = wire[5] or {}
        self._client = client

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} queue={self.queue!r} id={self.id} attempts={self.attempts} "
            f"payload={self.payload[:32]!r}{'...' if len(self.payload) > 32 else ''}>"
        )


class Message(MessageData):
    """A message delivered to an :class:`AsyncClient`. Its settle methods are the client's for this one message:
    they return once the settle is queued; ``wait=True`` waits until it is durable and raises its errors there
    (see :meth:`AsyncClient.ack`)."""

    __slots__ = ()
    _client: AsyncClient

    async def ack(self, *, wait: bool = False) -> None:
        """Delete the message: it was processed."""
        await self._client.ack(self, wait=wait)

    async def nack(self, delay: float | None = None, *, wait: bool = False) -> None:
        """Make the message ready again, after ``delay`` seconds if given (else the queue's retry delay)."""
        await self._client.nack(self, delay=delay, wait=wait)

    async def reject(self, *, wait: bool = False) -> None:
        """Move the message to its queue's dead-letter queue now."""
        await self._client.reject(self, wait=wait)

    async def touch(self, lease: float = 30.0, *, wait: bool = False) -> None:
        """Extend the lease to ``lease`` seconds from now."""
        await self._client.touch(self, lease=lease, wait=wait)


class SyncMessage(MessageData):
    """A message delivered to a blocking :class:`Client`. Its settle methods are the client's for this one
    message: the request is written before they return, except for an ack, nack or reject inside a
    ``consume()`` loop, held back and written with others by the client's first call 0.02 s later at the latest;
    replies are read later; ``wait=True`` waits until it is durable and raises its errors there (see
    :meth:`Client.ack`)."""

    __slots__ = ()
    _client: Client

    def ack(self, *, wait: bool = False) -> None:
        """Delete the message: it was processed."""
        self._client.ack(self, wait=wait)

    def nack(self, delay: float | None = None, *, wait: bool = False) -> None:
        """Make the message ready again, after ``delay`` seconds if given (else the queue's retry delay)."""
        self._client.nack(self, delay=delay, wait=wait)

    def reject(self, *, wait: bool = False) -> None:
        """Move the message to its queue's dead-letter queue now."""
        self._client.reject(self, wait=wait)

    def touch(self, lease: float = 30.0, *, wait: bool = False) -> None:
        """Extend the lease to ``lease`` seconds from now."""
        self._client.touch(self, lease=lease, wait=wait)


class PeekedMessage:
    """A ready message read by ``peek()``: not leased, so it has no token and cannot be settled.

    ``attempts`` is its deliveries so far (0 if never delivered); the other fields are as in :class:`MessageData`.
    """

    __slots__ = ("attempts", "headers", "id", "payload", "published_at", "queue")

    def __init__(self, queue: str, wire: list[Any]) -> None:
        self.queue = queue
        self.id: int = wire[0]
        self.attempts: int = wire[1]
        self.published_at: float = wire[2]
        self.payload: bytes = wire[3]
        self.headers: dict[str, str] = wire[4] or {}

    def __repr__(self) -> str:
        return (
            f"<PeekedMessage queue={self.queue!r} id={self.id} attempts={self.attempts} "
            f"payload={self.payload[:32]!r}{'...' if len(self.payload) > 32 else ''}>"
        )
