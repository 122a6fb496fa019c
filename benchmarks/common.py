"""Shared by the benchmarks: timing, the machine description, the results file, and the clock
that reads evaluations off an orchestrator's log."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeat: int = 5) -> float:
    """Median seconds of `repeat` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def record(name: str, rows: list[dict]) -> None:
    """Print rows as a table and store them in benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row))  # rows of two workloads differ
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(_cell(row.get(k, "")) for k in keys))


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
# The orchestrator's evaluation lines: a sync or diloco round's ("round 22/220 (epoch 1): loss 0.97,
# test accuracy 0.86, test loss 0.60"), and an async epoch's ("epoch 1 done (22/220 global batches,
# version 21): test_accuracy 0.8600").
_ROUND = re.compile(_STAMP + r".*: round (\d+)/\d+ \(epoch \d+\): loss [-0-9.naif]+, (.*)$", re.M)
_ASYNC_EPOCH = re.compile(_STAMP + r".*: epoch \d+ done \((\d+)/\d+ global batches, version \d+\): (.*)$", re.M)


def log_clock(text: str) -> list[tuple[float, dict]]:
    """(seconds since "starting at round 0", figures) of each evaluation line of an orchestrator log,
    in time order; the figures carry the round (global batches, for async) it followed as `round`,
    their names with underscores (`test_accuracy`)."""
    start = re.search(_STAMP + r".*starting at round 0\b", text, re.M)
    if not start:
        return []
    t0 = _when(start.group(1))
    out = []
    for stamp, round_, figures in sorted(_ROUND.findall(text) + _ASYNC_EPOCH.findall(text)):
        values = {"round": int(round_)}
        for item in figures.split(", "):
            name, _, value = item.rpartition(" ")
            try:
                values[name.replace(" ", "_")] = float(value)
            except ValueError:
                continue
        out.append(((_when(stamp) - t0).total_seconds(), values))
    return out


def _when(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
