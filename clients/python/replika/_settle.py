"""Settles not waited for, part of the SDK's sans-IO core (:class:`replika._core.ClientProtocol` owns one).

An ``ack()``, ``nack()``, ``reject()`` or ``touch()`` without ``wait=True`` returns before the broker confirmed
it. Here such settles are coalesced (consecutive ones of the same op, queue and options become one request),
remembered until their replies come, and their failures kept until the client raises them to its caller (the
next call, ``flush()`` or ``close()``; SPEC.md §5 "Settles not waited for"). The rule for when settles held
back must leave (:meth:`Settles.due`, which the blocking client asks since it has no loop turn to end) is here
too, with the clock passed in. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from replika._message import MessageData
from replika.errors import ConnectionLost, ReplikaError, StaleLease, error_from_reply
from replika_protocol import Frame

#: Settled messages the blocking client holds back (in a consume() loop) at most before it writes them: enough
#: that a request's fixed cost (a frame to build, decode and answer, a send) is spread over many, few enough
#: (about 10 KiB of request) that a burst does not sit long. consume()'s fetches usually take them sooner (one
#: every half window).
SETTLE_BATCH = 512
#: Seconds a settle may wait in the blocking client before the next call on the client writes it: short beside
#: a lease (30 s by default), so that holding acks back costs a redelivery only in what it delays, long beside
#: the microseconds a fast consumer loop takes per message, so that such a loop sends one request per many.
SETTLE_DELAY = 0.02


@dataclass(slots=True)
class _Group:
    """Settles queued since the last request was built: they become one request (or several of max_batch)."""

    op: str
    queue: str
    extra: dict[str, Any]
    ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class Settles:
    """The settles of one client: the group still open, the requests sent and not yet answered, and the failures
    not yet raised to the caller (which outlive a connection)."""

    def __init__(self) -> None:
        self._open: _Group | None = None
        # rid -> (op, queue, count), in send order: the first key is the oldest unconfirmed request.
        self._sent: dict[int, tuple[str, str, int]] = {}
        # (rid, queue, error), oldest first: rid is the request the failure belongs to, so that a flush() raises
        # only its own (two tasks waiting on one client must each learn of their settles, not of the other's).
        self._errors: list[tuple[int, str, ReplikaError]] = []
        self._held = 0  # messages settled and not yet taken to be written (Settles.written)
        self._held_since = 0.0  # the clock's time when the oldest of them was settled

    @property
    def has_open(self) -> bool:
        return self._open is not None

    @property
    def unconfirmed(self) -> int:
        """Settle requests sent and not yet answered."""
        return len(self._sent)

    @property
    def has_errors(self) -> bool:
        return bool(self._errors)

    def add(
        self, op: str, msgs: Iterable[MessageData], extra: dict[str, Any], close: Callable[[], None], at: float = 0.0
    ) -> None:
        """Queue ``op`` of ``msgs``, settled at time ``at`` of the caller's clock (seconds; only :meth:`due`
        reads it); ``close`` builds the open group's requests when a different one begins. Only consecutive
        settles share a request, so the broker applies them in call order."""
        group = self._open
        if not self._held:
            self._held_since = at
        for m in msgs:
            if group is None or group.queue != m.queue or group.op != op or group.extra != extra:
                if group is not None:
                    close()
                group = self._open = _Group(op, m.queue, extra)
            group.ids.append(m.id)
            group.tokens.append(m.token)
            self._held += 1

    def written(self) -> None:
        """Every settle queued so far has been taken to be written: none is held back any more."""
        self._held = 0

    def due(self, now: float, ahead: float = 0.0) -> bool:
        """Whether the settles held back must be written now, at time ``now`` (seconds, the clock given to
        :meth:`add`): SETTLE_BATCH messages are held, or the oldest was settled SETTLE_DELAY ago or more, or
        would be by ``ahead`` seconds from now (the time the caller is expected to take before its next call)."""
        held = self._held
        return held > 0 and (held >= SETTLE_BATCH or now + ahead - self._held_since >= SETTLE_DELAY)

    def take_open(self) -> _Group | None:
        group, self._open = self._open, None
        return group

    def sent(self, rid: int, op: str, queue: str, count: int) -> None:
        self._sent[rid] = (op, queue, count)

    def last_sent(self) -> int:
        """The id of the newest settle request sent (0 if none is unconfirmed): a mark for :meth:`done_through`."""
        return next(reversed(self._sent)) if self._sent else 0

    def done_through(self, mark: int) -> bool:
        """Whether every settle request up to id ``mark`` has been answered (or given up with its connection)."""
        return not self._sent or next(iter(self._sent)) > mark

    def on_reply(self, rid: int, reply: Frame) -> bool:
        """Take ``reply`` if it answers a settle sent here (False: it does not); keep its failure, if any."""
        info = self._sent.pop(rid, None)
        if info is None:
            return False
        op, queue, count = info
        if reply.get("ok") is not True:
            error = error_from_reply(reply)
            error.message = f"{op} of {count} message(s) of queue {queue!r}, not waited for: {error.message}"
            self._errors.append((rid, queue, error))
        elif failed := reply.get("failed"):
            reasons = reply.get("reasons") or {}
            self._errors.append((rid, queue, StaleLease("", "STALE_LEASE", failed, reasons)))
        return True

    def connection_lost(self, covered: int = 0) -> ConnectionLost | None:
        """The connection is gone with settles unconfirmed or unsent: whether they were applied is unknown. The
        error saying so is returned (None if nothing was lost), for the waiters of barriers up to request id
        ``covered`` to raise; it is also kept for a later call if some lost settle is not covered by one."""
        rids = list(self._sent)
        count = sum(n for _, _, n in self._sent.values())
        group = self.take_open()
        unsent = len(group.ids) if group is not None else 0
        self._sent.clear()
        self._held = 0
        if not count and not unsent:
            return None
        error = ConnectionLost(
            f"the connection was lost with {count + unsent} settle(s) unconfirmed ({unsent} of them not sent): "
            "each may or may not have been applied; a message whose ack was not is delivered again"
        )
        uncovered = [rid for rid in rids if rid > covered]
        if uncovered or unsent:
            self._errors.append((uncovered[0] if uncovered else covered + 1, "", error))
        return error

    def take_error(self, mark: int | None = None) -> ReplikaError | None:
        """The oldest failure not yet raised of a settle request up to id ``mark`` (any, if None), now handed to
        the caller to raise. Refusals of consecutive requests of one queue (one call split into several) become
        one :class:`StaleLease`."""
        errors = self._errors
        at = next((i for i, (rid, _, _) in enumerate(errors) if mark is None or rid <= mark), None)
        if at is None:
            return None
        _, queue, error = errors.pop(at)
        if type(error) is not StaleLease:
            return error
        failed, reasons = dict(error.failed), dict(error.reasons)
        while at < len(errors):
            rid, q, more = errors[at]
            if q != queue or type(more) is not StaleLease or (mark is not None and rid > mark):
                break
            failed.update(more.failed)
            reasons.update(more.reasons)
            errors.pop(at)
        why = ", ".join(f"{i} ({reasons[i]})" if i in reasons else str(i) for i in sorted(failed))
        message = f"settles of queue {queue!r}: {len(failed)} lease(s) no longer current: {why}"
        return StaleLease(message, "STALE_LEASE", failed, reasons)
