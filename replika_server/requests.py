"""Validation of request frames into store operations: every field's presence, type and range.

Nothing here touches a socket or the store: a frame goes in, an op (or a :class:`RequestError` with a stable code)
comes out. Field names and limits are those of SPEC.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from replika_protocol import MAX_HEADERS_BYTES, ErrorCode, Frame, is_valid_queue_name
from replika_server.store import (
    Ack,
    Declare,
    DeleteQueue,
    Fetch,
    Nack,
    Publish,
    Purge,
    QueueOptions,
    Reject,
    Settle,
    Stats,
    Touch,
)

__all__ = ["Limits", "RequestError", "parse_op"]

#: Longest long-poll a fetch may ask for, in seconds: long enough to idle cheaply, short enough to notice a
#: half-open connection within minutes.
MAX_WAIT = 300.0
#: Longest lease, in seconds (12 h): a consumer needing more should touch() as it goes.
MAX_LEASE = 12 * 3600.0
#: Longest nack delay, in seconds (30 days).
MAX_DELAY = 30 * 86400.0
MAX_ATTEMPTS = 1_000_000
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
        raise _bad(f"field {key!r} must be between {lo:g} and {hi:g}")
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


def _headers(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _bad("headers must be a map of str to str")
    if sum(len(k.encode()) + len(v.encode()) for k, v in value.items()) > MAX_HEADERS_BYTES:
        raise _bad(f"headers of one message may take at most {MAX_HEADERS_BYTES} bytes")
    return value or None


def _publish(frame: Frame, owner: int, limits: Limits) -> Publish:
    queue = queue_field(frame)
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
    return Publish(queue, payloads, headers)


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


def _settle(cls: type[Settle]) -> Any:
    def parse(frame: Frame, owner: int, limits: Limits) -> Settle:
        return cls(queue_field(frame), _leases(frame, limits), owner)

    return parse


def _nack(frame: Frame, owner: int, limits: Limits) -> Nack:
    delay = _number(frame, "delay", 0.0, 0.0, MAX_DELAY)
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
    queue = queue_field(frame)
    max_attempts = _int(frame, "max_attempts", None, 1, MAX_ATTEMPTS)
    dead_letter = queue_field(frame, "dead_letter") if frame.get("dead_letter") is not None else None
    if dead_letter == queue:
        raise _bad("a queue cannot be its own dead-letter queue")
    max_length = _int(frame, "max_length", None, 1, _U64 - 1)
    max_bytes = _int(frame, "max_bytes", None, 1, _U64 - 1)
    return Declare(queue, QueueOptions(max_attempts, dead_letter, max_length, max_bytes))


def _stats(frame: Frame, owner: int, limits: Limits) -> Stats:
    return Stats(queue_field(frame))


def _queues(frame: Frame, owner: int, limits: Limits) -> Stats:
    return Stats(None)


_PARSERS: dict[str, Any] = {
    "publish": _publish,
    "ack": _settle(Ack),
    "nack": _nack,
    "reject": _settle(Reject),
    "touch": _touch,
    "declare": _declare,
    "delete_queue": lambda frame, owner, limits: DeleteQueue(queue_field(frame)),
    "purge": lambda frame, owner, limits: Purge(queue_field(frame)),
    "stats": _stats,
    "queues": _queues,
}


def parse_op(name: str, frame: Frame, owner: int, limits: Limits) -> Any:
    """The store op for request ``frame`` (any op but hello, ping and fetch), or :class:`RequestError`."""
    parser = _PARSERS.get(name)
    if parser is None:
        raise RequestError(ErrorCode.UNKNOWN_OP, f"unknown op {name!r}")
    return parser(frame, owner, limits)
