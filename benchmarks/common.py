"""Shared by the benchmarks: timing, the machine description, and the results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
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
