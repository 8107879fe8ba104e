"""Validation of request frames into store operations: every field's presence, type and range.

Nothing here touches a socket or the store: a frame goes in, an op (or a :class:`RequestError` with a stable code)
comes out. Field names and limits are those of SPEC.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from replika_protocol import MAX_HEADERS_BYTES, ErrorCode, Frame, Op, is_valid_queue_name
from replika_server.store import (
    Ack,
    Bind,
    Declare,
    DeleteQueue,
    Fetch,
    Nack,
    Peek,
    Publish,
    PublishTopic,
    Purge,
    QueueOptions,
    Redrive,
    Reject,
    Stats,
    Touch,
    Unbind,
    is_valid_pattern,
)
from replika_server.store import Op as StoreOp
from replika_server.store.base import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_HISTORY_MESSAGES,
    DEFAULT_HISTORY_RETENTION,
    DEFAULT_RETRY_BACKOFF,
    MAX_HISTORY_MESSAGES,
    MAX_HISTORY_RETENTION,
    TERMINAL,
    History,
    HistoryList,
    HistoryOptions,
)

__all__ = ["Limits", "RequestError", "declare_op", "parse_op"]

#: Longest long-poll a fetch may ask for, in seconds: long enough to idle cheaply, short enough to notice a
#: half-open connection within minutes.
MAX_WAIT = 300.0
#: Longest lease, in seconds (12 h): a consumer needing more should touch() as it goes.
MAX_LEASE = 12 * 3600.0
#: Longest nack or publish delay, and longest retry delay, in seconds (30 days).
MAX_DELAY = 30 * 86400.0
MAX_ATTEMPTS = 1_000_000
#: Longest message TTL, in seconds (10 years): any real retention, and still a finite expiry time.
MAX_TTL = 3650 * 86400.0
#: Shortest TTL, in seconds: a TTL is a deadline to deliver by, not "never".
MIN_TTL = 0.001
#: Largest retry backoff factor: 100 already reaches any retry_max_delay within a handful of attempts.
MAX_BACKOFF = 100.0
#: Longest dedup window, in seconds (7 days): the index holds every id seen within it.
MAX_DEDUP_WINDOW = 7 * 86400.0
#: Longest dedup id, in UTF-8 bytes.
MAX_DEDUP_ID = 255
#: Priorities: 0 (the default, lowest) to 9.
MAX_PRIORITY = 9
_U64 = 2**64


class RequestError(Exception):
    """A request the server refuses; the connection stays usable."""

    def __init__(self, code: ErrorCode, message: str, extra: Frame | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra  # more fields for the error reply (retry_after)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits a request is checked against. Sizes in bytes."""

    max_batch: int
    max_payload: int
    max_reply_bytes: int  # what one fetch reply may carry: the frame limit less room for the envelope


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_REQUEST, message)


def queue_field(frame: Frame, key: str = "queue") -> str:
    name = frame.get(key)
    if not is_valid_queue_name(name):
        if name is None:
            raise _bad(f"missing field {key!r}")
        raise _bad(f"field {key!r} must be a queue name: 1-255 characters of [A-Za-z0-9._:-]")
    assert isinstance(name, str)
    return name


def _number(frame: Frame, key: str, default: float, lo: float, hi: float) -> float:
    value = frame.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"field {key!r} must be a number")
    if not lo <= value <= hi:
        raise _bad(f"field {key!r} must be between {lo:.15g} and {hi:.15g}")  # 7776000, not 7.776e+06
    return float(value)


def _int(frame: Frame, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = frame.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field {key!r} must be an integer")
    if not lo <= value <= hi:
        raise _bad(f"field {key!r} must be between {lo} and {hi}")
    return value


def _headers(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _bad("headers must be a map of str to str")
    if sum(len(k.encode()) + len(v.encode()) for k, v in value.items()) > MAX_HEADERS_BYTES:
        raise _bad(f"headers of one message may take at most {MAX_HEADERS_BYTES} bytes")
    return value or None


def _choice(frame: Frame, key: str, choices: tuple[str, ...]) -> str:
    value = frame.get(key)
    if value is None:
        return choices[0]
    if value not in choices or not isinstance(value, str):
        raise _bad(f"field {key!r} must be one of {', '.join(repr(c) for c in choices)}")
    return value


def _optional_number(frame: Frame, key: str, lo: float, hi: float) -> float | None:
    return None if frame.get(key) is None else _number(frame, key, 0.0, lo, hi)


def _dedup_ids(frame: Frame, n: int) -> list[str | None] | None:
    ids = frame.get("dedup_ids")
    if ids is None:
        return None
    if type(ids) is not list or len(ids) != n:
        raise _bad("field 'dedup_ids' must be an array with one entry (str or nil) per payload")
    for dedup_id in ids:
        if dedup_id is not None and (not isinstance(dedup_id, str) or not 1 <= len(dedup_id.encode()) <= MAX_DEDUP_ID):
            raise _bad(f"each dedup id must be nil or a str of 1 to {MAX_DEDUP_ID} UTF-8 bytes")
    return ids if any(dedup_id is not None for dedup_id in ids) else None


def _messages(frame: Frame, limits: Limits) -> Publish:
    """The fields a publish and a publish_topic share, as a Publish to no queue yet."""
    payloads = frame.get("payloads")
    if not isinstance(payloads, list) or not payloads:
        raise _bad("field 'payloads' must be a non-empty array of bin")
    if len(payloads) > limits.max_batch:
        raise RequestError(ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_batch} payloads per publish")
    for i, payload in enumerate(payloads):
        if isinstance(payload, str):
            payloads[i] = payload = payload.encode()
        elif not isinstance(payload, bytes):
            raise _bad("field 'payloads' must be an array of bin (or str, stored as UTF-8)")
        if len(payload) > limits.max_payload:
            raise RequestError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"payload {i} is {len(payload)} bytes; the limit is {limits.max_payload}",
            )
    headers = frame.get("headers")
    if headers is not None:
        if not isinstance(headers, list) or len(headers) != len(payloads):
            raise _bad("field 'headers' must be an array with one entry (map or nil) per payload")
        headers = [_headers(h) for h in headers]
        if not any(headers):
            headers = None
    priority = _int(frame, "priority", 0, 0, MAX_PRIORITY)
    assert priority is not None
    delay = _number(frame, "delay", 0.0, 0.0, MAX_DELAY)
    ttl = _optional_number(frame, "ttl", MIN_TTL, MAX_TTL)
    return Publish("", payloads, headers, priority, delay, ttl, _dedup_ids(frame, len(payloads)))


def _publish(frame: Frame, owner: int, limits: Limits) -> Publish:
    queue = queue_field(frame)
    op = _messages(frame, limits)
    op.queue = queue
    op.owner = owner
    return op


def _publish_topic(frame: Frame, owner: int, limits: Limits) -> PublishTopic:
    topic = frame.get("topic")
    if not is_valid_queue_name(topic):
        raise _bad("field 'topic' must be 1-255 characters of [A-Za-z0-9._:-] (words separated by dots)")
    assert isinstance(topic, str)
    m = _messages(frame, limits)
    return PublishTopic(topic, m.payloads, m.headers, m.priority, m.delay, m.ttl, m.dedup_ids)


#: Turns a request's fields into its store op (the connection's lease owner id and the limits given), or raises
#: RequestError.
Parser = Callable[[Frame, int, Limits], StoreOp]


def _binding(cls: type[Bind] | type[Unbind]) -> Parser:
    def parse(frame: Frame, owner: int, limits: Limits) -> Bind | Unbind:
        queue = queue_field(frame)
        pattern = frame.get("pattern")
        if not is_valid_pattern(pattern):
            raise _bad(
                "field 'pattern' must be 1-255 characters of [A-Za-z0-9._:-] and the wildcards * and #, each a whole "
                "dot-separated word"
            )
        assert isinstance(pattern, str)
        return cls(queue, pattern)

    return parse


def fetch_op(frame: Frame, owner: int, limits: Limits) -> tuple[Fetch, float]:
    """The fetch op and its long-poll wait in seconds. ``max`` above the batch limit is lowered to it."""
    queue = queue_field(frame)
    count = _int(frame, "max", 1, 1, _U64 - 1)
    assert count is not None
    wait = _number(frame, "wait", 0.0, 0.0, MAX_WAIT)
    lease = _number(frame, "lease", 30.0, 0.001, MAX_LEASE)
    return Fetch(queue, min(count, limits.max_batch), lease, owner, limits.max_reply_bytes), wait


def _leases(frame: Frame, limits: Limits) -> Iterable[Sequence[int]]:
    """The (id, token) pairs of a settle request: ``ids`` and ``tokens`` (two arrays, the compact form the SDK
    sends) or ``leases`` (an array of [id, token] pairs)."""
    ids, tokens = frame.get("ids"), frame.get("tokens")
    if ids is not None or tokens is not None:
        if type(ids) is not list or type(tokens) is not list or len(ids) != len(tokens) or not ids:
            raise _bad("fields 'ids' and 'tokens' must be non-empty arrays of the same length")
        if len(ids) > limits.max_batch:
            raise RequestError(ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_batch} leases per request")
        # map/set/min/max run in C: checking 10,000 integers costs microseconds, not a Python loop.
        if set(map(type, ids)) | set(map(type, tokens)) != {int} or min(ids) < 0 or min(tokens) < 0:
            raise _bad("'ids' and 'tokens' must hold unsigned integers")
        if max(ids) >= _U64 or max(tokens) >= _U64:
            raise _bad("'ids' and 'tokens' must hold unsigned 64-bit integers")
        return zip(ids, tokens, strict=True)
    leases = frame.get("leases")
    if not isinstance(leases, list) or not leases:
        raise _bad("a settle request needs 'ids' and 'tokens', or 'leases': an array of [id, token] pairs")
    if len(leases) > limits.max_batch:
        raise RequestError(ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_batch} leases per request")
    for pair in leases:
        if type(pair) is not list or len(pair) != 2:
            raise _bad("each lease must be an array [id, token] of two unsigned integers")
        mid, token = pair
        if type(mid) is not int or type(token) is not int or not (0 <= mid < _U64 and 0 <= token < _U64):
            raise _bad("each lease must be an array [id, token] of two unsigned integers")
    return leases


def _settle(cls: type[Ack] | type[Reject]) -> Parser:
    def parse(frame: Frame, owner: int, limits: Limits) -> Ack | Reject:
        return cls(queue_field(frame), _leases(frame, limits), owner)

    return parse


def _nack(frame: Frame, owner: int, limits: Limits) -> Nack:
    delay = _optional_number(frame, "delay", 0.0, MAX_DELAY)
    unseen = frame.get("unseen", False)
    if unseen is None:
        unseen = False
    if not isinstance(unseen, bool):
        raise _bad("field 'unseen' must be a boolean")
    return Nack(queue_field(frame), _leases(frame, limits), owner, delay, unseen)


def _touch(frame: Frame, owner: int, limits: Limits) -> Touch:
    lease = _number(frame, "lease", 30.0, 0.001, MAX_LEASE)
    return Touch(queue_field(frame), _leases(frame, limits), owner, lease)


def _declare(frame: Frame, owner: int, limits: Limits) -> Declare:
    return declare_op(frame)


def declare_op(frame: Frame) -> Declare:
    """The op of a declare request ``frame``, its options checked; also for the queues of the config file, so
    that a file can declare nothing a client could not."""
    queue = queue_field(frame)
    max_attempts = _int(frame, "max_attempts", None, 1, MAX_ATTEMPTS)
    dead_letter = queue_field(frame, "dead_letter") if frame.get("dead_letter") is not None else None
    if dead_letter == queue:
        raise _bad("a queue cannot be its own dead-letter queue")
    max_length = _int(frame, "max_length", None, 1, _U64 - 1)
    max_bytes = _int(frame, "max_bytes", None, 1, _U64 - 1)
    options = QueueOptions(
        max_attempts,
        dead_letter,
        max_length,
        max_bytes,
        overflow=_choice(frame, "overflow", ("reject", "drop_oldest", "dead_letter")),  # type: ignore[arg-type]
        retry_delay=_number(frame, "retry_delay", 0.0, 0.0, MAX_DELAY),
        retry_backoff=_number(frame, "retry_backoff", DEFAULT_RETRY_BACKOFF, 1.0, MAX_BACKOFF),
        retry_max_delay=_optional_number(frame, "retry_max_delay", 0.0, MAX_DELAY),
        message_ttl=_optional_number(frame, "message_ttl", MIN_TTL, MAX_TTL),
        expired=_choice(frame, "expired", ("dead_letter", "drop")),  # type: ignore[arg-type]
        dedup_window=_number(frame, "dedup_window", DEFAULT_DEDUP_WINDOW, 0.0, MAX_DEDUP_WINDOW),
        history=_history_options(frame),
    )
    return Declare(queue, options)


def _history_options(frame: Frame) -> HistoryOptions | None:
    """``history``: nil or false (off), true (on with the defaults), or a map of ``retention`` (seconds),
    ``max_messages`` and ``payloads`` (bool), each optional."""
    value = frame.get("history")
    if value is None or value is False:
        return None
    if value is True:
        return HistoryOptions()
    if not isinstance(value, dict) or not set(value) <= {"retention", "max_messages", "payloads"}:
        raise _bad("field 'history' must be a boolean or a map of retention, max_messages and payloads")
    retention = _number(value, "retention", DEFAULT_HISTORY_RETENTION, 1.0, MAX_HISTORY_RETENTION)
    max_messages = _int(value, "max_messages", DEFAULT_HISTORY_MESSAGES, 1, MAX_HISTORY_MESSAGES)
    payloads = value.get("payloads", False)
    if not isinstance(payloads, bool):
        raise _bad("field 'payloads' of 'history' must be a boolean")
    assert max_messages is not None
    return HistoryOptions(retention, max_messages, payloads)


def _peek(frame: Frame, owner: int, limits: Limits) -> Peek:
    queue = queue_field(frame)
    count = _int(frame, "max", 1, 1, _U64 - 1)
    assert count is not None
    return Peek(queue, min(count, limits.max_batch), limits.max_reply_bytes)


def _redrive(frame: Frame, owner: int, limits: Limits) -> Redrive:
    queue = queue_field(frame)
    to = queue_field(frame, "to") if frame.get("to") is not None else None
    if to == queue:
        raise _bad("'to' must name another queue than 'queue'")
    count = _int(frame, "max", limits.max_batch, 1, _U64 - 1)
    assert count is not None
    return Redrive(queue, to, min(count, limits.max_batch))


def _stats(frame: Frame, owner: int, limits: Limits) -> Stats:
    return Stats(queue_field(frame))


def _queues(frame: Frame, owner: int, limits: Limits) -> Stats:
    return Stats(None)


#: Most messages one history listing returns.
MAX_HISTORY_LIST = 1000
_STATES = ("waiting", "in_flight", *sorted(kind.value for kind in TERMINAL))


def _history(frame: Frame, owner: int, limits: Limits) -> History | HistoryList:
    """``history``: with ``message_id``, that message's recorded life; without, a listing (SPEC.md §5 history)."""
    queue = queue_field(frame)
    mid = _int(frame, "message_id", None, 1, _U64 - 1)
    if mid is not None:
        return History(queue, mid)
    state = frame.get("state")
    if state is not None and state not in _STATES:
        raise _bad(f"field 'state' must be one of {', '.join(_STATES)}")
    header = frame.get("header")
    if header is not None and not (
        type(header) is list and len(header) == 2 and all(isinstance(part, str) for part in header)
    ):
        raise _bad("field 'header' must be an array [name, value] of two strings")
    listing = _int(frame, "max", 100, 1, MAX_HISTORY_LIST)
    assert listing is not None
    return HistoryList(
        queue,
        listing,
        state,
        _optional_number(frame, "since", 0.0, 1e11),
        _optional_number(frame, "until", 0.0, 1e11),
        (header[0], header[1]) if header is not None else None,
    )


def _delete_queue(frame: Frame, owner: int, limits: Limits) -> DeleteQueue:
    return DeleteQueue(queue_field(frame))


def _purge(frame: Frame, owner: int, limits: Limits) -> Purge:
    return Purge(queue_field(frame))


#: Every op but hello, ping (the connection's own) and fetch (:func:`fetch_op`, which has a long-poll wait too).
_PARSERS: dict[str, Parser] = {
    Op.PUBLISH: _publish,
    Op.ACK: _settle(Ack),
    Op.NACK: _nack,
    Op.REJECT: _settle(Reject),
    Op.TOUCH: _touch,
    Op.DECLARE: _declare,
    Op.DELETE_QUEUE: _delete_queue,
    Op.PURGE: _purge,
    Op.STATS: _stats,
    Op.QUEUES: _queues,
    Op.PEEK: _peek,
    Op.REDRIVE: _redrive,
    Op.PUBLISH_TOPIC: _publish_topic,
    Op.BIND: _binding(Bind),
    Op.UNBIND: _binding(Unbind),
    Op.HISTORY: _history,
}


def parse_op(name: str, frame: Frame, owner: int, limits: Limits) -> StoreOp:
    """The store op for request ``frame`` (any op but hello, ping and fetch), or :class:`RequestError`."""
    parser = _PARSERS.get(name)
    if parser is None:
        raise RequestError(ErrorCode.UNKNOWN_OP, f"unknown op {name!r}")
    return parser(frame, owner, limits)
