"""Smoke test of `python -m benchmarks.train --quick`: the rows come out, with finite positive
numbers on both sides (never a speed: benchmarks measure, tests assert)."""

from __future__ import annotations

import math

import pytest

from benchmarks import train


@pytest.mark.slow
def test_quick_rows_have_finite_positive_numbers():
    rows = train.run(train.QUICK, train.QUICK_TARGET, runs=1)

    assert [r["config"] for r in rows] == [c.label for c in train.QUICK]
    for r in rows:
        for key in ("pangea s", "ddp s", "pangea/ddp time", "ddp MB (modelled)"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        if r["pangea MB"] != "n/a":  # once metrics.json counts the bytes workers send
            assert isinstance(r["pangea MB"], float) and math.isfinite(r["pangea MB"]) and r["pangea MB"] > 0
        assert 0 < r["final acc pangea"] <= 1 and 0 < r["final acc ddp"] <= 1
        assert r["pangea clock"] == "log"  # the orchestrator's log was read, not pro-rated from its total
        # the same batches, shards, init and optimizer: DDP and Pangea's sync rounds agree
        assert r["params max|diff|"] <= 1e-4


def test_the_median_run_is_the_middle_time_to_target_with_failures_slowest():
    def outcome(seconds: float | None) -> train.Outcome:
        return train.Outcome([0.5, 0.9], [(1.0, 0.5), (seconds, 0.9)] if seconds else [(1.0, 0.5)])

    runs = [outcome(3.0), outcome(1.0), outcome(2.0)]
    assert train.median_run(runs, 0.9) is runs[2]
    five = outcome(5.0)
    assert train.median_run(["pangea run exited 1", five, outcome(4.0)], 0.9) is five
    assert train.median_run(["pangea run exited 1", five, outcome(None)], 0.9) != five
    assert train.median_run([outcome(1.0), outcome(2.0)], 0.9).seconds_to(0.9) == 2.0
