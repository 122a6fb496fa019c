"""The benchmarks run and give sane rows; what they measure is never asserted."""

from __future__ import annotations

import math

import pytest

import benchmarks.latency as latency_benchmark
import benchmarks.round as round_benchmark


@pytest.mark.slow
def test_round_quick():
    rows = round_benchmark.run(quick=True)
    assert rows
    for row in rows:
        assert row["P"] > 0
        for key in ("pangea_round_s", "metrics_round_s", "compute_s", "gloo_allreduce_s", "peak_rss_over_model"):
            assert math.isfinite(row[key]), (key, row)
        for key in ("pangea_round_s", "metrics_round_s", "compute_s", "gloo_allreduce_s"):
            assert row[key] > 0, (key, row)
        assert all(row[f"cpu_{kind}_s"] >= 0 for kind in ("workers", "orchestrator", "preprocessor", "nats")), row


@pytest.mark.slow
def test_latency_once():
    """One run of each kind: a bare two-hop median and a tiny-model round, both positive."""
    (row,) = latency_benchmark.run(runs=1, trips=30)
    assert row["bare_two_hops_s"] > 0 and row["pangea_round_s"] > 0, row
    assert math.isfinite(row["pangea / two hops"]), row
