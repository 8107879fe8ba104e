"""What the harness needs from a system under test: connect, reset a queue, publish confirmed, consume + ack.

One driver instance is one client connection. Workloads are written once against this interface and run
unchanged against Replika and every peer, so the comparison measures the systems, not the harness.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class PeerUnavailable(Exception):
    """The peer is not installed or could not be started; the harness skips it with this message."""


class Driver(abc.ABC):
    """One connection to one system. All methods are coroutines run on the harness's event loop."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection (and whatever channel/session the client library needs)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    async def reset(self, queue: str) -> None:
        """Make ``queue`` exist, durable, and empty (delete and re-create is fine)."""

    @abc.abstractmethod
    async def publish(self, queue: str, payloads: list[bytes]) -> None:
        """Publish ``payloads`` durably; return only once the system has confirmed every one of them.
        Use the client's batching/pipelining the way its documentation recommends for throughput."""

    async def publish_one(self, queue: str, payload: bytes) -> None:
        """One message, one confirmed round trip (W3 latency)."""
        await self.publish(queue, [payload])

    @abc.abstractmethod
    async def consume(self, queue: str, max: int, wait: float) -> list[bytes]:
        """Receive up to ``max`` messages (waiting up to ``wait`` seconds for the first), acknowledge them all
        (batched where the system allows), and return their payloads in delivery order. [] when none came."""

    #: W7 loops this system has besides its default one, each reported as "<variant> msg/s".
    consume_variants: tuple[str, ...] = ()

    @abc.abstractmethod
    async def consume_each(self, queue: str, count: int, seconds: float, variant: str = "") -> int:
        """W7: take messages of ``queue`` in the client library's own idiomatic consumer loop, acknowledging each
        one on its own as the library's documentation teaches, until ``count`` were taken or ``seconds`` passed;
        return how many were taken. ``variant`` names one of :attr:`consume_variants` ("" is the default)."""


@dataclass
class System:
    """A system under test as the harness sees it: a label and a factory of connected drivers."""

    name: str  # e.g. "replika", "redis (fsync always)"
    make_driver: Callable[[], Driver]
    stop: Callable[[], Awaitable[None]] | None = None  # stops the server the harness started, if any
    notes: list[str] = field(default_factory=list)
