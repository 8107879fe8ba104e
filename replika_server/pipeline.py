"""The one request path of every front end (TCP, text protocol, HTTP, GraphQL): validate, authorize,
rate-limit, submit to the broker, and hand back the op's typed result for the front end to format.

Each front end calls :meth:`Pipeline.authenticate` once per client and :meth:`Pipeline.admit` per request, so none
can do what another could not. Nothing here knows a socket or a reply format.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from replika_protocol import ErrorCode, Frame, Op
from replika_server.auth import AuthTable, Principal, anonymous, default_limit, load_auth
from replika_server.broker import Broker
from replika_server.config import Config, ConfigError
from replika_server.metrics import LATENCY_BUCKETS, Histogram
from replika_server.requests import Limits, RequestError, fetch_op, parse_op
from replika_server.store import (
    Ack,
    Bind,
    Declare,
    DeleteQueue,
    Fetch,
    History,
    HistoryList,
    Nack,
    Peek,
    Publish,
    PublishTopic,
    Purge,
    QueueStats,
    Redrive,
    Reject,
    Result,
    Stats,
    StoreError,
    Touch,
    Unbind,
)
from replika_server.store import Op as StoreOp

__all__ = ["Admitted", "Outcome", "Pipeline"]

log = structlog.get_logger("replika.pipeline")

#: What a front end gets for an admitted request: the op's result, or the StoreError it failed with.
Outcome = Result | StoreError

#: Ops that need the ``admin`` permission, and what the refusal says they do.
_ADMIN_OPS: dict[type, str] = {
    Declare: "declare",
    DeleteQueue: "delete",
    Purge: "purge",
    Redrive: "redrive",
    Bind: "bind",
    Unbind: "unbind",
}


class Admitted:
    """A request that passed validation, authorization and the rate limit: :meth:`run` submits it."""

    __slots__ = ("_pipeline", "_principal", "op", "wait")

    def __init__(self, pipeline: Pipeline, principal: Principal, op: StoreOp, wait: float = 0.0) -> None:
        self._pipeline = pipeline
        self._principal = principal
        self.op = op
        self.wait = wait  # a fetch's long poll, in seconds

    def run(self, done: Callable[[Outcome], None]) -> None:
        """Hand the op to the broker; ``done`` gets its result once it is durable (a fetch's, once it has
        messages or its wait ran out)."""
        self._pipeline.run(self, self._principal, done)


class Pipeline:
    """Admits requests for the broker, under the ``--auth`` tokens in force (reloaded by :meth:`reload_auth`)."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.limits = Limits(config.max_batch, config.max_payload, config.max_frame - 1024)
        # publish request admitted -> its commit confirmed, whatever the front end
        self.publish_confirm = Histogram(LATENCY_BUCKETS)
        self._default_rate = default_limit(config.publish_rate, config.publish_burst)
        self._anonymous = anonymous(self._default_rate)
        self.auth: AuthTable | None = None
        if config.auth is not None:
            self.auth = load_auth(config.auth, self._default_rate)

    # ----------------------------------------------------------------------------------------------- who
    def authenticate(self, token: object) -> Principal | None:
        """Who ``token`` (from a hello, an AUTH line or an HTTP header) is; without ``--auth`` everybody is the
        anonymous principal."""
        if self.auth is None:
            return self._anonymous
        return self.auth.authenticate(token)

    def reload_auth(self) -> AuthTable | None:
        """Re-read the ``--auth`` file (SIGHUP): the new table, in force from now on, or None when there is no
        auth file or it does not load (then nothing changes). Clients whose token is gone are the front ends'
        to close (:meth:`AuthTable.successor`)."""
        if self.config.auth is None:
            return None
        try:
            table = load_auth(self.config.auth, self._default_rate, self.auth)
        except ConfigError as exc:
            log.error("auth_reload_failed", error=str(exc))
            return None
        self.auth = table
        return table

    # ----------------------------------------------------------------------------------------------- requests
    def admit(self, principal: Principal, name: str, frame: Frame, owner: int) -> Admitted:
        """Validate, authorize and rate-limit request ``frame`` of op ``name`` (any op but hello and ping) from
        lease owner ``owner``, or raise :class:`RequestError`."""
        if name == Op.FETCH:
            fetch, wait = fetch_op(frame, owner, self.limits)
            if not principal.may_consume(fetch.queue):
                raise _forbidden(principal, "consume from", fetch.queue)
            return Admitted(self, principal, fetch, wait)
        op = parse_op(name, frame, owner, self.limits)
        if type(op) is Publish:
            op.by = principal.name  # who published it, for the queue's history
        if not principal.everything:
            _authorize(principal, name, op)
        if principal.bucket is not None and isinstance(op, Publish | PublishTopic):
            # A topic publish counts its messages once, however many queues the topic reaches.
            wait = principal.bucket.take(len(op.payloads))
            if wait:
                raise RequestError(
                    ErrorCode.RATE_LIMITED,
                    f"token {principal.name!r} is over its publish rate; retry in {wait:.3f} s",
                    {"retry_after": round(wait, 3)},
                )
        return Admitted(self, principal, op)

    def run(self, admitted: Admitted, principal: Principal, done: Callable[[Outcome], None]) -> None:
        op = admitted.op
        if type(op) is Fetch:
            self.broker.fetch(op, admitted.wait, done)
        elif type(op) is Publish:
            self.broker.submit(op, self._timed(done, time.perf_counter()))
        elif type(op) is Stats and op.queue is None and not principal.admin:
            self.broker.submit(op, _visible_to(principal, done))
        else:
            self.broker.submit(op, done)

    def _timed(self, done: Callable[[Outcome], None], started: float) -> Callable[[Outcome], None]:
        def confirmed(result: Outcome) -> None:
            # perf_counter: uvloop's loop.time() has millisecond steps, too coarse for sub-millisecond confirms.
            self.publish_confirm.observe(time.perf_counter() - started)
            done(result)

        return confirmed


def _visible_to(principal: Principal, done: Callable[[Outcome], None]) -> Callable[[Outcome], None]:
    """A listing of every queue, cut down to those ``principal`` may see."""

    def filtered(result: Outcome) -> None:
        if isinstance(result, list):
            result = [s for s in result if isinstance(s, QueueStats) and principal.may_see(s.name)]
        done(result)

    return filtered


def _forbidden(principal: Principal, verb: str, queue: str) -> RequestError:
    where = f" queue {queue!r}" if queue else ""
    return RequestError(ErrorCode.FORBIDDEN, f"token {principal.name!r} may not {verb}{where}")


def _authorize(principal: Principal, name: str, op: StoreOp) -> None:
    """Raise FORBIDDEN unless ``principal`` may run ``op`` (request op ``name``)."""
    queue = ""
    if isinstance(op, Publish):
        allowed, verb, queue = principal.may_publish(op.queue), "publish to", op.queue
    elif isinstance(op, PublishTopic):
        # Which queues the topic reaches is known only in the store: it checks each against this, all or none.
        op.may_publish = principal.may_publish
        return
    elif isinstance(op, Ack | Nack | Reject | Touch):
        allowed, verb, queue = principal.may_consume(op.queue), f"{name} messages of", op.queue
    elif type(op) in _ADMIN_OPS:
        allowed, verb = principal.admin, _ADMIN_OPS[type(op)]
        queue = getattr(op, "queue", "") or ""
    elif isinstance(op, Peek | History | HistoryList):
        # History shows payloads and headers as peek does: the same permission.
        allowed, verb, queue = principal.admin or principal.may_consume(op.queue), "peek at", op.queue
    elif isinstance(op, Stats):
        if op.queue is None:
            return  # a listing: filtered down to what the principal may see
        allowed, verb, queue = principal.may_see(op.queue), "see the stats of", op.queue
    else:  # a new op must be given a rule here before anyone but an all-powerful token may use it
        allowed, verb = False, name
    if not allowed:
        raise _forbidden(principal, verb, queue)
