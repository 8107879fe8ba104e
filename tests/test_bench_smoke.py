"""A small-N run of the benchmark harness against a real broker: it must work end to end. Speed is never
asserted here; bench/RESULTS.md holds the measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import replika
from bench.drivers.replika_driver import ReplikaDriver
from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent


def test_harness_smoke_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--runs", "1", "--quiet", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [report] = tmp_path.glob("results-*.json")
    doc = json.loads(report.read_text())
    assert not doc["failures"]
    workloads = {row["workload"] for row in doc["rows"]}
    assert workloads == {"W1", "W2", "W3", "W4", "W5", "W6", "W7"}
    w7 = {row["metric"] for row in doc["rows"] if row["workload"] == "W7"}
    assert w7 == {"msg/s", "blocking msg/s"}  # the async and the blocking client's loops
    assert all(row["median"] > 0 for row in doc["rows"])
    assert "| W1 | msg/s | replika (sync) |" in result.stdout


def test_history_cost_runs_alternate_on_one_broker(tmp_path: Path) -> None:
    args = ["--smoke", "--runs", "2", "--workloads", "W1,W2", "--history", "both", "--quiet", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [report] = tmp_path.glob("results-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert {(r["workload"], r["system"], r["runs"]) for r in rows} == {
        (w, s, 2) for w in ("W1", "W2") for s in ("replika (sync)", "replika (sync, history)")
    }


async def test_the_replika_driver_declares_history_when_asked(server: RunningServer) -> None:
    for history, expected in ((True, True), (False, False)):
        driver = ReplikaDriver(server.url, history=history)
        await driver.connect()
        try:
            await driver.reset("w1")
            await driver.publish("w1", [b"x"])
            async with replika.AsyncClient(server.url) as client:
                assert ((await client.stats("w1"))["history"] is not None) is expected
                if expected:
                    assert (await client.history_list("w1"))[0]["state"] == "waiting"
        finally:
            await driver.close()


def test_memory_harness_small_run() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--count", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "restart after kill -9 until the first fetch is served" in result.stdout


@pytest.mark.frameworks
def test_w8_smoke_run(tmp_path: Path) -> None:
    """Bench W8 (Celery on Replika) with 200 tasks, Replika alone: the harness works end to end."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.w8", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [report] = tmp_path.glob("w8-*.json")
    [replika_result] = json.loads(report.read_text())["results"]
    assert replika_result["rates"][0] > 0 and replika_result["duplicates"] == [0]
    assert "| replika (sync) |" in result.stdout
