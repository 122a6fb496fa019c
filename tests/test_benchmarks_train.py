"""Smoke test of `python -m benchmarks.train --quick`: the rows come out, with finite positive
numbers on both sides (never a speed: benchmarks measure, tests assert)."""

from __future__ import annotations

import math

import pytest

from benchmarks import train


@pytest.mark.slow
def test_quick_rows_have_finite_positive_numbers():
    rows = train.run(train.QUICK, train.QUICK_TARGET)

    assert [r["config"] for r in rows] == [c.label for c in train.QUICK]
    for r in rows:
        for key in ("pangea s", "ddp s", "pangea/ddp time", "ddp MB (modelled)"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        if r["pangea MB"] != "n/a":  # once metrics.json counts the bytes workers send
            assert isinstance(r["pangea MB"], float) and math.isfinite(r["pangea MB"]) and r["pangea MB"] > 0
        assert 0 < r["final acc pangea"] <= 1 and 0 < r["final acc ddp"] <= 1
        # the same batches, shards, init and optimizer: DDP and Pangea's sync rounds agree
        assert r["params max|diff|"] <= 1e-4
