"""The one place where the admin sidecar meets the rest of the broker: :class:`BrokerView`, what the sidecar calls
and reads, and the few types those calls take and give back.

Every other module of ``replika_server.admin`` reaches the broker through :class:`~replika_server.admin.ops.Ops`,
which holds a :class:`BrokerView` and nothing else of the broker's. Whatever object the composition root hands
to :meth:`~replika_server.admin.AdminServer.serve` (:class:`replika_server.node.Node`) only has to have these members:
they are structural (a :class:`typing.Protocol`), so this package never imports the server, and moving the
request pipeline elsewhere means pointing this view at the new home, and nothing in the sidecar's routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any, Protocol, runtime_checkable

from replika_protocol import Frame
from replika_server.auth import Principal
from replika_server.config import Config
from replika_server.metrics import Histogram
from replika_server.requests import MAX_DELAY, MAX_LEASE, RequestError
from replika_server.store import QueueStats, StaleReason, Stats, StoreCode, StoreError

__all__ = [
    "MAX_DELAY",
    "MAX_LEASE",
    "BrokerState",
    "BrokerView",
    "QueueStats",
    "Reauthenticator",
    "Reply",
    "RequestError",
    "StaleReason",
    "Stats",
    "StoreCode",
    "StoreError",
]

#: Gets a request's reply map (without ``id`` and ``ok``), or the :class:`StoreError` it failed with.
Reply = Callable[[Frame | StoreError], None]


class Reauthenticator(Protocol):
    """The loaded ``--auth`` file, as far as a long-lived feed needs it after a reload."""

    def successor(self, old: Principal, /) -> Principal | None:
        """The principal ``old`` is now (new permissions, same token), or None if its token was removed."""
        ...


@runtime_checkable
class BrokerState(Protocol):
    """The batch loop under the request pipeline: read directly for the sampler, probes and metrics."""

    @property
    def batches(self) -> int:
        """Group commits run so far."""
        ...

    @property
    def batch_ops(self) -> Histogram:
        """Requests per group commit."""
        ...

    @property
    def commit_seconds(self) -> Histogram:
        """Seconds applying and committing one group commit took."""
        ...

    def consumers(self, queue: str, /) -> int:
        """Fetches long-polling ``queue`` now."""
        ...

    def submit(self, op: Stats, done: Callable[[Any], None], /) -> None:
        """Run ``op`` in the next batch; ``done`` gets its ``list[QueueStats]`` or a :class:`StoreError`.
        Unauthorized and unmetered: only for the sidecar's own reads (every queue's stats, the readiness probe),
        never on behalf of an HTTP client, whose requests go through :meth:`BrokerView.admit`."""
        ...


@runtime_checkable
class BrokerView(Protocol):
    """What the admin sidecar uses of the broker process: the request pipeline (:meth:`admit`), token lookup,
    and the state that ``/api/info`` and ``/metrics`` show."""

    @property
    def config(self) -> Config:
        """The broker's validated configuration."""
        ...

    @property
    def version(self) -> str:
        """The broker's version string."""
        ...

    @property
    def port(self) -> int:
        """The bound TCP port of the broker protocol."""
        ...

    @property
    def started_at(self) -> float:
        """When the broker started, in seconds since the epoch."""
        ...

    @property
    def connections(self) -> Sized:
        """The open client connections (only counted here)."""
        ...

    @property
    def accepted(self) -> int:
        """Client connections accepted since start."""
        ...

    @property
    def refused(self) -> int:
        """Client connections refused at ``--max-connections`` since start."""
        ...

    @property
    def publish_confirm(self) -> Histogram:
        """Seconds from a publish request's arrival to its durable confirmation."""
        ...

    @property
    def auth(self) -> Reauthenticator | None:
        """The loaded ``--auth`` file, None without ``--auth``."""
        ...

    @property
    def broker(self) -> BrokerState:
        """The batch loop."""
        ...

    def store_bytes(self) -> int:
        """Bytes the store takes on disk."""
        ...

    def authenticate(self, token: object, /) -> Principal | None:
        """Who ``token`` is (None: nobody); without ``--auth`` everybody is the anonymous principal."""
        ...

    def admit(self, principal: Principal, op: str, frame: Frame, owner: int, /) -> Callable[[Reply], None]:
        """Validate, authorize and rate-limit request ``frame`` for ``principal`` as the TCP protocol does, or
        raise :class:`RequestError`. The returned function runs it; its argument gets the reply map or the
        :class:`StoreError`."""
        ...
