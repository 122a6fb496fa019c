"""Robust aggregators against hand computations, and a poisoned worker in a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pangea.train import robust
from pangea.train.aggregate import RoundAccumulator
from pangea.wire.chunking import split
from tests.cluster import Cluster


def test_trimmed_mean_by_hand():
    rows = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]])
    # column 0 sorted: 1 2 3 4 100 -> drop 1 and 100 -> mean(2, 3, 4) = 3
    # column 1 sorted: -50 10 20 30 40 -> drop -50 and 40 -> mean(10, 20, 30) = 20
    np.testing.assert_allclose(robust.trimmed_mean(rows, 1), [3.0, 20.0])
    np.testing.assert_allclose(robust.trimmed_mean(rows, 0), rows.mean(axis=0))
    with pytest.raises(ValueError):
        robust.trimmed_mean(rows, 3)


def test_median_by_hand():
    rows = np.array([[1.0, 7.0], [5.0, -1.0], [3.0, 2.0], [1000.0, 3.0]])
    np.testing.assert_allclose(robust.median(rows), [4.0, 2.5])


def test_krum_picks_the_most_central_honest_row():
    honest = np.array([[1.0, 1.0], [1.2, 1.0], [1.0, 1.2], [0.8, 1.0]])  # row 0 is the centre
    rows = np.vstack([honest, [[50.0, -50.0]]])
    # f = 1, k = 5: each row is scored on its k - f - 2 = 2 nearest others, computed here by hand.
    d = lambda a, b: float(np.sum((a - b) ** 2))  # noqa: E731
    scores = [sum(sorted(d(rows[i], rows[j]) for j in range(5) if j != i)[:2]) for i in range(5)]
    best = int(np.argmin(scores))
    assert best == 0 and sorted(scores)[1] > scores[0] + 1e-9  # no tie: the centre wins
    np.testing.assert_array_equal(robust.krum(rows, 1), rows[best])
    with pytest.raises(ValueError):
        robust.krum(rows[:3], 1)


def test_clip_scales_only_long_rows():
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    np.testing.assert_allclose(robust.clip(rows, 1.0), [[0.6, 0.8], [0.3, 0.4]])


def test_mean_is_sample_weighted():
    rows = np.array([[1.0], [4.0]])
    np.testing.assert_allclose(robust.combine(rows, np.array([3.0, 1.0]), "mean", 1), [1.75])


def test_accumulator_keeps_rows_for_robust_combination():
    rng = np.random.default_rng(1)
    grads = {s: rng.normal(size=50).astype(np.float32) for s in range(5)}
    grads[4] *= -20  # the poisoned one
    acc = RoundAccumulator(0, 50, {s: 10 for s in grads}, keep_rows=True)
    for s, g in grads.items():
        for chunk, values in split(g, 64):
            acc.add(s, 10, 0.1, chunk, values)
    rows = np.stack(list(grads.values())).astype(np.float64)
    np.testing.assert_allclose(acc.robust("median", 1, 0.0), np.median(rows, axis=0), rtol=1e-6)
    np.testing.assert_allclose(acc.robust("trimmed-mean", 1, 0.0), robust.trimmed_mean(rows, 1), rtol=1e-6)
    np.testing.assert_allclose(acc.mean(), rows.mean(axis=0), rtol=1e-5, atol=1e-6)


def _poisoned_run(nats_url: str, job: str, tmp_path, aggregator: str) -> tuple[float, str]:
    """(final test accuracy, or 0 if training diverged; the orchestrator's log)."""
    cluster = Cluster(nats_url, job, tmp_path)
    out = tmp_path / "run"
    try:
        for i in range(4):
            cluster.worker(f"h{i}", torch_threads=1)
        cluster.worker("evil", torch_threads=1, test_attack="scale")
        cluster.start("pre", "preprocessor")
        cluster.start(
            "orch",
            "orchestrator",
            "--workers",
            "5",
            "--epochs",
            "25",
            "--batch-size",
            "100",
            "--aggregator",
            aggregator,
            "--out",
            str(out),
        )
        code = cluster.procs["orch"].wait(timeout=600)
    finally:
        cluster.close()
    if code != 0:
        return 0.0, cluster.log("orch")
    return json.loads((out / "metrics.json").read_text())["final_test_accuracy"] or 0.0, cluster.log("orch")


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["trimmed-mean", "median"])
def test_robust_aggregator_survives_a_poisoned_worker(nats_url, job, tmp_path, aggregator):
    accuracy, log = _poisoned_run(nats_url, job, tmp_path, aggregator)
    assert accuracy >= 0.95, log[-2000:]


@pytest.mark.slow
def test_mean_is_poisoned_by_one_worker(nats_url, job, tmp_path):
    accuracy, log = _poisoned_run(nats_url, job, tmp_path, "mean")
    assert accuracy < 0.95
    if accuracy == 0.0:  # the usual outcome: the poisoned mean makes the parameters blow up
        assert "training diverged at round" in log
