"""Protocol version and default limits, shared by the server and the SDK."""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_PAYLOAD",
    "FRAME_ROOM",
    "MAX_HEADERS_BYTES",
    "MAX_QUEUE_NAME",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "is_valid_queue_name",
]

#: The protocol version this code speaks; the handshake picks the highest version both sides list.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

#: 16 MiB: room for a batch of a thousand 16 KiB messages, or one message at the payload limit, while a
#: hostile peer declaring a huge length is refused before anything is allocated for it.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
#: 8 MiB per message: a broker is not a blob store; larger objects belong elsewhere with a reference here.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
#: Messages per publish, fetch or ack frame. Large enough that one commit amortises its fsync well.
DEFAULT_MAX_BATCH = 10_000
#: Bytes of one message's headers (keys and values, UTF-8). With the payload limit this bounds a stored message,
#: so that any one message, dead-letter headers and reply envelope included, fits in a fetch reply.
MAX_HEADERS_BYTES = 16 * 1024
#: What max_frame must leave beyond max_payload: the headers limit plus 4 KiB of envelope and dead-letter headers.
FRAME_ROOM = MAX_HEADERS_BYTES + 4 * 1024
#: Queue names are 1-255 bytes of [A-Za-z0-9._:-] (DESIGN.md).
MAX_QUEUE_NAME = 255

_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,255}")


def is_valid_queue_name(name: object) -> bool:
    """True when ``name`` is a str of 1-255 characters from ``[A-Za-z0-9._:-]``."""
    return isinstance(name, str) and _QUEUE_NAME.fullmatch(name) is not None
