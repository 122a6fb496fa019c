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
        assert 0 < row["idle_mb"] <= row["peak_mb"], row  # idle: the lowest RSS before round 0
        assert row["msgs_in"] > 0 and row["msgs_out"] > 0, row  # a round is talk the server counts


@pytest.mark.slow
def test_data_once():
    """A small folder: both sides give positive images/s for 1 and 2 data workers."""
    from benchmarks import data

    rows = data.run(images=256, batches=3)
    assert [r["data workers"] for r in rows] == [1, 2]
    for row in rows:
        assert row["pangea images/s"] > 0 and row["DataLoader images/s"] > 0 and math.isfinite(row["ratio"]), row
    assert "goal >= 0.8" in data.goal_line(rows)


@pytest.mark.slow
def test_latency_once():
    """One run of each kind: a bare two-hop median and a tiny-model round, both positive."""
    (row,) = latency_benchmark.run(runs=1, trips=30)
    assert row["bare_two_hops_s"] > 0 and row["pangea_round_s"] > 0, row
    assert math.isfinite(row["pangea / two hops"]), row
    assert row["msgs_in"] > 0 and row["msgs_out"] > 0, row


@pytest.mark.slow
def test_tokens_once():
    """One short run of each side: positive tokens/s, and the two trained the same thing."""
    from benchmarks import tokens

    (row,) = tokens.run(runs=1, steps=25)
    assert row["notes"] == "-", row
    for key in ("pangea tokens/s", "ddp tokens/s", "pangea/ddp"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["max |bits/byte diff|"] <= 1e-3, row  # sync rounds compute what DDP computes


@pytest.mark.slow
@pytest.mark.timeout(900)  # two sides of up to 240 s each, with start-up
def test_goodput_kills_on_both_sides_and_both_reach_the_target():
    """A kill every 10 s to an easy target (3.6 bits/byte, ~75 steps): both sides lose workers
    (Pangea's supervisor restarts them, torchrun restarts every rank from a checkpoint) and still
    get there.  Not every 6 s: torchrun's restart of all ranks takes 3-4 s on 2 idle cores and more
    under load, and at 6 s DDP never reached its first evaluation (49 kills in 300 s, in a fresh-clone CI run)."""
    from benchmarks import goodput
    from benchmarks.lab import LM, Workload

    easy = Workload(**{**LM.__dict__, "target": 3.6, "timeout": 240})
    rows = goodput.run(easy, every=10)
    assert [r["side"] for r in rows] == ["ddp torchrun restart-all, checkpoint every evaluation", "pangea run"]
    for r in rows:
        assert isinstance(r["time to target s"], float) and r["time to target s"] > 0, r
        assert r["kills"] >= 1, r
    assert isinstance(rows[1]["/ ddp"], float) and math.isfinite(rows[1]["/ ddp"]), rows
