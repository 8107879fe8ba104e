#!/usr/bin/env python3
"""Print the bytes of a short Replika session, as SPEC.md section 10 shows them.

Connects to a running server with a plain socket (it starts nothing), sends hello, publish, fetch, ack, the same
ack again (refused with STALE_LEASE) and a publish to an invalid queue name (BAD_REQUEST), and prints every request
and reply as a hex dump (offset, hex bytes, ASCII) followed by its decoded value.

    python scripts/spec_session.py [HOST:PORT | replika://HOST:PORT] [--queue NAME]

Run it against a fresh data directory to get the ids shown in SPEC.md; published_at and lease tokens differ
between runs.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import urllib.parse
from typing import Any

from replika_protocol import HEADER_SIZE, decode_body, encode_frame


def hexdump(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:08x}  {hexpart:<48}  |{text}|")
    return "\n".join(lines)


def parse_target(text: str) -> tuple[str, int]:
    if "://" not in text:
        text = "replika://" + text
    parts = urllib.parse.urlsplit(text)
    return parts.hostname or "127.0.0.1", parts.port or 8777


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    """One complete reply frame, exactly as received: length prefix then body."""
    head = recv_exact(sock, HEADER_SIZE)
    (length,) = struct.unpack(">I", head)
    return head + recv_exact(sock, length)


def exchange(sock: socket.socket, title: str, request: dict[str, Any]) -> dict[str, Any]:
    data = encode_frame(request)
    print(f"=== {title}: request ({len(data)} bytes = 4-byte length + {len(data) - HEADER_SIZE}-byte body)")
    print(hexdump(data))
    print(f"    {request!r}")
    sock.sendall(data)
    raw = recv_frame(sock)
    reply = decode_body(raw[HEADER_SIZE:])
    print(f"--- {title}: reply ({len(raw)} bytes = 4-byte length + {len(raw) - HEADER_SIZE}-byte body)")
    print(hexdump(raw))
    print(f"    {reply!r}")
    print()
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="127.0.0.1:8777", help="server address (default 127.0.0.1:8777)")
    parser.add_argument("--queue", default="demo", help="queue to use (default demo)")
    args = parser.parse_args(argv)
    host, port = parse_target(args.url)
    with socket.create_connection((host, port), timeout=10.0) as sock:
        exchange(sock, "hello", {"id": 1, "op": "hello", "versions": [1], "client": "spec"})
        exchange(
            sock,
            "publish",
            {"id": 2, "op": "publish", "queue": args.queue, "payloads": [b"hello"], "headers": [{"k": "v"}]},
        )
        reply = exchange(sock, "fetch", {"id": 3, "op": "fetch", "queue": args.queue, "max": 1, "lease": 30.0})
        if not reply.get("ok") or not reply.get("msgs"):
            print("fetch returned no message; is the queue shared with other clients?", file=sys.stderr)
            return 1
        mid, token = reply["msgs"][0][0], reply["msgs"][0][1]
        exchange(sock, "ack", {"id": 4, "op": "ack", "queue": args.queue, "leases": [[mid, token]]})
        exchange(sock, "ack again (STALE_LEASE)", {"id": 5, "op": "ack", "queue": args.queue, "leases": [[mid, token]]})
        exchange(sock, "bad queue name", {"id": 6, "op": "publish", "queue": "no spaces", "payloads": [b"x"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
