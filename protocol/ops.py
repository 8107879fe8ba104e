"""Operation names and the positional layout of a delivered message on the wire (SPEC.md, "Operations")."""

from __future__ import annotations

import enum

__all__ = ["MSG_ATTEMPTS", "MSG_HEADERS", "MSG_ID", "MSG_PAYLOAD", "MSG_PUBLISHED_AT", "MSG_TOKEN", "Op"]


class Op(enum.StrEnum):
    """Every request ``op`` the server understands."""

    HELLO = "hello"
    PING = "ping"
    DECLARE = "declare"
    DELETE_QUEUE = "delete_queue"
    PURGE = "purge"
    QUEUES = "queues"
    STATS = "stats"
    PUBLISH = "publish"
    FETCH = "fetch"
    ACK = "ack"
    NACK = "nack"
    REJECT = "reject"
    TOUCH = "touch"
    PEEK = "peek"
    REDRIVE = "redrive"
    PUBLISH_TOPIC = "publish_topic"
    BIND = "bind"
    UNBIND = "unbind"
    HISTORY = "history"


# A delivered message travels as a msgpack array, not a map: one fetch may carry thousands of them and the key
# strings would cost more than the fields. Positions:
MSG_ID = 0  # uint: per-queue message id
MSG_TOKEN = 1  # uint: lease token of this delivery
MSG_ATTEMPTS = 2  # uint: deliveries so far, 1 on the first
MSG_PUBLISHED_AT = 3  # float: unix seconds
MSG_PAYLOAD = 4  # bin
MSG_HEADERS = 5  # map str->str, or nil
