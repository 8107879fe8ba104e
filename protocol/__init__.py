"""Replika's wire protocol, free of I/O: framing, limits and error codes shared by the server and the SDK.

This package imports only the standard library and msgpack, so the server, the SDK and any tool can use it
without pulling in an event loop or sockets. SPEC.md is the authority on the format.
"""

from replika_protocol.errors import BadFrame, ErrorCode, FrameTooLarge, ProtocolError
from replika_protocol.framing import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    decode_body,
    encode_body,
    encode_frame,
    encode_frame_parts,
    frame_header,
)
from replika_protocol.limits import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_PAYLOAD,
    FRAME_ROOM,
    MAX_HEADERS_BYTES,
    MAX_QUEUE_NAME,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    is_valid_queue_name,
)
from replika_protocol.ops import Op

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_PAYLOAD",
    "FRAME_ROOM",
    "HEADER_SIZE",
    "MAX_HEADERS_BYTES",
    "MAX_QUEUE_NAME",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "BadFrame",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "Op",
    "ProtocolError",
    "decode_body",
    "encode_body",
    "encode_frame",
    "encode_frame_parts",
    "frame_header",
    "is_valid_queue_name",
]
