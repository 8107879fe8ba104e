"""Decode a captured Replika byte stream into readable frames: ``python -m replika_protocol.dump [FILE]``.

The input (a file, or stdin) may be the raw bytes (``nc ... | tee capture.bin``, a pcap payload saved from
Wireshark) or a hex dump of them: ``xxd`` output, ``tcpdump -X``/``-xx`` output (the ``0x0000:`` offset columns and
the ASCII column are skipped), ``od -An -tx1``, or bare hex digits. Each frame is printed with its offset, its
length and its body as JSON (bytes shown as strings when they are UTF-8 text, else as ``<N bytes: hex…>``).
A stream that starts with a letter is the text protocol and is printed as lines.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from typing import Any

from replika_protocol.framing import decode_body

__all__ = ["decode_stream", "main", "parse_hex_dump"]

_HEX_LINE = re.compile(r"^\s*(?:0x)?[0-9a-fA-F]+:\s+(.*)$")  # xxd "00000010: ..." and tcpdump "0x0010: ..."
_HEX_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2})+")


def parse_hex_dump(text: str) -> bytes:
    """The bytes of a hex dump: xxd, tcpdump -X, od -tx1 or bare hex; offsets and ASCII columns ignored."""
    out = bytearray()
    for line in text.splitlines():
        m = _HEX_LINE.match(line)
        body = m.group(1) if m else line
        # The ASCII column is separated from the hex by two or more spaces in xxd and tcpdump output.
        body = re.split(r"\s{2,}", body.strip())[0] if m else body
        for token in body.split():
            if _HEX_TOKEN.fullmatch(token):
                out += bytes.fromhex(token)
    return bytes(out)


def _looks_like_hex(data: bytes) -> bool:
    """Whether ``data`` is a hex dump: ASCII whose every line has an offset column or only hex tokens."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return False
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(
        _HEX_LINE.match(line) or all(_HEX_TOKEN.fullmatch(t) for t in line.split()) for line in lines
    )


def _readable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value)} bytes: {value[:32].hex()}{'…' if len(value) > 32 else ''}>"
        return text if len(text) <= 200 else text[:200] + f"… ({len(value)} bytes)"
    if isinstance(value, dict):
        return {str(k): _readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value


def decode_stream(data: bytes) -> list[str]:
    """Readable lines describing every frame of ``data``, and what is wrong where the stream breaks."""
    if data[:1].isalpha():
        return [f"text protocol: {line!r}" for line in data.decode("utf-8", "replace").splitlines()]
    lines: list[str] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            lines.append(f"@{pos}: {len(data) - pos} trailing bytes, not a whole length prefix: {data[pos:].hex()}")
            break
        (length,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4 : pos + 4 + length]
        if len(body) < length:
            lines.append(f"@{pos}: frame of {length} bytes, only {len(body)} captured")
            break
        try:
            frame = decode_body(body)
        except Exception as exc:  # the decoder's ProtocolError, reported rather than raised
            lines.append(f"@{pos}: {length} bytes that are not a frame body: {exc}")
        else:
            lines.append(f"@{pos} ({length} bytes): {json.dumps(_readable(frame), ensure_ascii=False)}")
        pos += 4 + length
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replika_protocol.dump", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="the capture (default: stdin)")
    parser.add_argument("--hex", action="store_true", help="the input is a hex dump (guessed when not given)")
    args = parser.parse_args(argv)
    if args.file:
        with open(args.file, "rb") as f:
            data = f.read()
    else:
        data = sys.stdin.buffer.read()
    if args.hex or _looks_like_hex(data):
        data = parse_hex_dump(data.decode("ascii", "replace"))
    for line in decode_stream(data):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
