"""Stable wire error codes and the codec's own exceptions.

Every error the server sends carries one of the codes in :class:`ErrorCode`; clients map them to exception
classes. The codec raises only :class:`ProtocolError` subclasses, whatever bytes it is fed.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["BadFrame", "ErrorCode", "FrameTooLarge", "ProtocolError"]


class ErrorCode(enum.StrEnum):
    """The stable, upper-case error codes of the wire protocol (SPEC.md, "Errors")."""

    BAD_FRAME = "BAD_FRAME"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_OP = "UNKNOWN_OP"
    BAD_REQUEST = "BAD_REQUEST"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    STALE_LEASE = "STALE_LEASE"
    QUEUE_FULL = "QUEUE_FULL"
    TOO_MANY_QUEUES = "TOO_MANY_QUEUES"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    STORE_FULL = "STORE_FULL"
    STORE_FAILED = "STORE_FAILED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame stream. The connection cannot continue.

    ``frames`` holds the valid frames that came before the corruption in the same ``feed`` call: the peer sent
    them, so they deserve their answers before the connection is closed.
    """

    code: ErrorCode = ErrorCode.BAD_FRAME

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.frames: list[dict[str, Any]] = []


class BadFrame(ProtocolError):
    """A frame whose body is not a single msgpack map."""

    code = ErrorCode.BAD_FRAME


class FrameTooLarge(ProtocolError):
    """A frame whose declared length exceeds the negotiated maximum (checked before any allocation)."""

    code = ErrorCode.FRAME_TOO_LARGE
