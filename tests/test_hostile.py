"""200 hostile connections at once (silent, half-sent frames, 2 GiB frame declarations, random bytes, slow
readers with short leases) against a real broker process, while a well-behaved client keeps working.

The figures (latencies, memory) are measured and printed by ``python -m bench.hostile``; here only what must
hold is checked: every well-behaved round trip is served, the broker survives, and its heap stays bounded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_well_behaved_client_is_served_while_200_hostile_connections_are_open() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.hostile",
            "--hostile",
            "200",
            "--round-trips",
            "40",
            "--",
            "--max-outbound",
            "1M",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    assert "well-behaved round trips (publish+fetch+ack): 40," in result.stdout
    growth = re.search(r"\(\+(-?[\d.]+) MiB\)", result.stdout)
    assert growth is not None, result.stdout
    # 40 slow readers may each have 1 MiB of replies plus one 256 KiB message waiting: 50 MiB at most, with
    # room for the allocator and the other 160 connections' buffers (64 KiB each before the handshake).
    assert float(growth.group(1)) < 96, result.stdout
