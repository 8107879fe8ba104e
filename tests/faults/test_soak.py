"""A one-minute soak (bench/soak.py's mixed load against a broker process): no fd leak, bounded RSS growth.

The 15-minute run is a recorded benchmark (bench/RESULTS.md); this one only asserts what a minute can show
without timing anything: file descriptors back where they were and RSS within 10% of its post-warm-up level.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import FD_SLACK, Sample, analyse, soak

pytestmark = pytest.mark.faults


async def test_a_minute_of_mixed_load_leaks_no_fds_and_grows_no_memory(tmp_path: Path) -> None:
    report = await soak(60, interval=5, rate=300, workdir=tmp_path, max_rss_growth=0.10)
    assert len(report.samples) >= 10
    last = report.samples[-1]
    assert last.published > 1000 and last.consumed > 1000 and last.churned > 50 and last.polls > 10, last
    assert report.fd_growth <= FD_SLACK, report.flags
    assert report.rss_growth < 0.10, report.flags


def _samples(rss: list[int], fds: list[int]) -> list[Sample]:
    return [Sample(i * 5.0, r, f, {}, 1.0, 2.0, 0, 0, 0, 0) for i, (r, f) in enumerate(zip(rss, fds, strict=True))]


def test_the_analysis_flags_growth_and_only_growth() -> None:
    steady = analyse(_samples([100_000] * 10, [30, 32, 31, 30, 33, 30, 31, 30, 32, 31]))
    assert not steady.flags
    leaking = analyse(_samples([100_000 + 2_000 * i for i in range(10)], [30 + 5 * i for i in range(10)]))
    assert len(leaking.flags) == 2, leaking.flags
