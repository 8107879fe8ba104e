"""python -m replika_protocol.dump: captured bytes, raw or as a hex dump, back into readable frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from replika_protocol import encode_frame
from replika_protocol.dump import decode_stream, parse_hex_dump

STREAM = encode_frame({"op": "hello", "id": 0, "versions": [1]}) + encode_frame(
    {"op": "publish", "id": 1, "queue": "jobs", "payloads": [b"hi", b"\xff\xfe"]}
)


def xxd(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}: {groups:<40}  {text}")
    return "\n".join(lines)


def test_frames_are_decoded_readably() -> None:
    lines = decode_stream(STREAM)
    assert lines[0].startswith("@0 (") and '"op": "hello"' in lines[0]
    assert '"payloads": ["hi", "<2 bytes: fffe>"]' in lines[1]


def test_hex_dumps_in_several_formats_give_the_same_bytes() -> None:
    assert parse_hex_dump(xxd(STREAM)) == STREAM
    assert parse_hex_dump(STREAM.hex()) == STREAM
    assert parse_hex_dump(" ".join(f"{b:02x}" for b in STREAM)) == STREAM  # od -An -tx1
    rows = xxd(STREAM).splitlines()
    tcpdump = "\n".join(f"\t0x{16 * i:04x}:  " + row.split(": ", 1)[1] for i, row in enumerate(rows))
    assert parse_hex_dump(tcpdump) == STREAM


def test_a_broken_stream_says_where(tmp_path: Path) -> None:
    lines = decode_stream(STREAM + b"\x00\x00\x00\x10abc")
    assert lines[-1] == f"@{len(STREAM)}: frame of 16 bytes, only 3 captured"
    assert "not a frame body" in decode_stream(b"\x00\x00\x00\x01\xc1")[0]


def test_the_command_line(tmp_path: Path) -> None:
    capture = tmp_path / "capture.txt"
    capture.write_text(xxd(STREAM))
    result = subprocess.run(
        [sys.executable, "-m", "replika_protocol.dump", str(capture)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 2 and '"queue": "jobs"' in result.stdout
    text = subprocess.run(
        [sys.executable, "-m", "replika_protocol.dump"], input="PING\nPUB jobs hi\n", capture_output=True, text=True
    )
    assert "text protocol: 'PUB jobs hi'" in text.stdout
