"""Runs workloads against systems, and reports medians, spreads and ratios as a table, JSON and a PNG chart."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.drivers.base import System
from bench.workloads import WORKLOADS, Params


class Progress:
    """A one-line progress bar on a terminal, a line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        elapsed = time.monotonic() - self.started
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:6.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1

    def finish(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


@dataclass
class Row:
    workload: str
    metric: str
    system: str
    median: float
    low: float
    high: float
    runs: int
    samples: list[float] = field(default_factory=list)  # each run's figure, in run order


async def run_all(
    systems: list[System], workloads: list[str], params: Params, runs: int, progress: Progress
) -> tuple[list[Row], list[str]]:
    """Every workload ``runs`` times against every system; returns the summary rows and any failures. Each run
    goes through every system in turn, so that a slow spell of a shared machine falls on all of them alike."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    failures: list[str] = []
    for run in range(runs):
        for system in systems:
            for name in workloads:
                progress.step(f"{system.name} {name} run {run + 1}/{runs}")
                try:
                    result = await asyncio.wait_for(WORKLOADS[name](system, params), params.timeout)
                except Exception as exc:  # one system failing a workload must not end the comparison
                    failures.append(f"{system.name} {name} run {run + 1}: {type(exc).__name__}: {exc}")
                    result = {}
                for metric, value in result.items():
                    samples.setdefault((name, metric, system.name), []).append(value)
                progress.advance()
    progress.finish()
    rows = [
        Row(w, m, s, statistics.median(v), min(v), max(v), len(v), v)
        for (w, m, s), v in sorted(samples.items(), key=lambda kv: (kv[0][0], natural_key(kv[0][1])))
    ]
    return rows, failures


def natural_key(text: str) -> list[Any]:
    """Sort key that puts "16 conns" before "256 conns" and "4KiB" before "64KiB"."""
    scaled = re.sub(r"(\d+)(KiB|MiB)", lambda m: str(int(m[1]) * {"KiB": 1024, "MiB": 1024**2}[m[2]]) + "B", text)
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", scaled)]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def ratio(rows: list[Row], row: Row, base: str) -> str:
    """Replika / this system, oriented so that > 1 means Replika is better (throughput up, latency down)."""
    ours = next((r for r in rows if r.workload == row.workload and r.metric == row.metric and r.system == base), None)
    if ours is None or row.system == base or not row.median or not ours.median:
        return ""
    better = ours.median / row.median if row.metric.endswith("msg/s") else row.median / ours.median
    return f"{better:.2f}x"


def table(rows: list[Row], base: str) -> str:
    """A Markdown table: median [min-max] per system and metric, with Replika's advantage per peer."""
    lines = [
        "| workload | metric | system | median | min-max | runs | Replika advantage |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.metric} | {r.system} | {_fmt(r.median)} | {_fmt(r.low)}-{_fmt(r.high)} "
            f"| {r.runs} | {ratio(rows, r, base)} |"
        )
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], params: Params, systems: list[System], failures: list[str]) -> None:
    doc: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "params": asdict(params),
        "systems": [{"name": s.name, "notes": s.notes} for s in systems],
        "rows": [asdict(r) for r in rows],
        "failures": failures,
    }
    path.write_text(json.dumps(doc, indent=2))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def write_chart(path: Path, rows: list[Row]) -> bool:
    """A grouped bar chart of every throughput metric, one bar per system (log scale). False without
    matplotlib (``pip install -r bench/requirements.txt``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = sorted(
        {(r.workload, r.metric) for r in rows if r.metric.endswith("msg/s")}, key=lambda wm: (wm[0], natural_key(wm[1]))
    )
    systems = sorted({r.system for r in rows}, key=lambda s: (not s.startswith("replika"), s))
    if not metrics:
        return False
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(8, len(metrics) * 0.9), 5))
    for i, system in enumerate(systems):
        values = []
        for w, m in metrics:
            r = next((r for r in rows if (r.workload, r.metric, r.system) == (w, m, system)), None)
            values.append(r.median if r else 0)
        ax.bar([x + i * width for x in range(len(metrics))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(metrics))])
    ax.set_xticklabels([f"{w} {m.removesuffix(' msg/s')}" for w, m in metrics], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("messages per second (median, log scale)")
    ax.set_title("Replika and peers, throughput per workload")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
