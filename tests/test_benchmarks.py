"""The benchmarks run and give sane rows; what they measure is never asserted."""

from __future__ import annotations

import math

import pytest

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
