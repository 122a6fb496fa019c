"""A run's TensorBoard event files, read back with TensorBoard's own reader, and the smoothed loss in curves.png."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from pangea.train.events import EventLog
from pangea.train.outputs import Metrics, plot_curves, plot_dashboard, smooth, smoothing_weight

SEED = 7
PNG = b"\x89PNG\r\n\x1a\n"


def _read(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `directory` as TensorBoard shows it: tag -> [(step, value)]."""
    reader = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every point
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def _steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]


def _values(series: list[tuple[int, float]]) -> list[float]:
    return [value for _, value in series]


def _age(directory: Path) -> None:
    """Make the event files there look written by an earlier process.

    A file's name starts with the second it was opened, and TensorBoard reads a run's files in name
    order; two writers of one process within one second are told apart by a counter compared as
    text (…9 after …10), which a test that opens several writers must not depend on."""
    for i, path in enumerate(sorted(directory.glob("*tfevents*"))):
        path.rename(directory / f"events.out.tfevents.{i:010d}.earlier.0.0")


def _write_rounds(log: EventLog, rounds: range, loss_of, lrs=None) -> None:
    for r in rounds:
        log.add_round(r, loss=loss_of(r), lrs=lrs or {"lr": 0.1}, samples=32, seconds=0.5, workers=2)


# ---------------------------------------------------------------- EventLog


def test_rounds_and_evaluations_read_back_under_their_tags(tmp_path):
    with EventLog(tmp_path, targets_per_sample=4) as log:
        for r in range(4):
            log.add_round(r, loss=2.0 - 0.25 * r, lrs={"lr": 0.01 * (r + 1)}, samples=64, seconds=0.5, workers=r + 1)
            if r % 2 == 1:
                log.add_evaluation(r, {"val_loss": 1.5 - 0.1 * r, "bits_per_byte": 2.0 + r})

    series = _read(tmp_path)
    assert set(series) == {
        "train/loss",
        "train/lr",
        "train/round_seconds",
        "train/workers",
        "train/samples_per_second",
        "train/tokens_per_second",
        "eval/val_loss",
        "eval/bits_per_byte",
    }
    rounds = [0, 1, 2, 3]
    for tag in ("train/loss", "train/lr", "train/round_seconds", "train/workers", "train/samples_per_second"):
        assert _steps(series[tag]) == rounds, tag
    # Scalars travel as float32: compare at its precision.
    assert _values(series["train/loss"]) == pytest.approx([2.0, 1.75, 1.5, 1.25], rel=1e-6)
    assert _values(series["train/lr"]) == pytest.approx([0.01, 0.02, 0.03, 0.04], rel=1e-6)
    assert _values(series["train/round_seconds"]) == pytest.approx([0.5] * 4)
    assert _values(series["train/workers"]) == [1, 2, 3, 4]
    assert _values(series["train/samples_per_second"]) == pytest.approx([128.0] * 4)
    assert _values(series["train/tokens_per_second"]) == pytest.approx([512.0] * 4)
    assert series["eval/val_loss"] == [(1, pytest.approx(1.4, rel=1e-6)), (3, pytest.approx(1.2, rel=1e-6))]
    assert series["eval/bits_per_byte"] == [(1, 3.0), (3, 5.0)]


def test_one_lr_tag_per_group_and_no_tokens_for_one_target(tmp_path):
    with EventLog(tmp_path) as log:  # targets_per_sample 1: a classifier, samples are the unit
        _write_rounds(log, range(2), lambda r: 1.0, lrs={"body": 0.1, "head": 0.5})

    series = _read(tmp_path)
    assert series["train/lr/body"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.1))]
    assert series["train/lr/head"] == [(0, 0.5), (1, 0.5)]
    assert "train/lr" not in series and "train/tokens_per_second" not in series


def test_a_resumed_run_replaces_the_rounds_after_its_checkpoint(tmp_path):
    with EventLog(tmp_path) as first:  # reached round 5, then stopped; its last checkpoint is round 3's
        _write_rounds(first, range(6), lambda r: 10.0 + r)
        for r in (1, 3, 5):
            first.add_evaluation(r, {"test_accuracy": r / 10})
    _age(tmp_path)
    with EventLog(tmp_path, first_round=3) as resumed:  # computes rounds 3.. again, differently
        _write_rounds(resumed, range(3, 5), lambda r: 20.0 + r)
        resumed.add_evaluation(4, {"test_accuracy": 0.9})

    series = _read(tmp_path)
    assert series["train/loss"] == [(0, 10.0), (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert _steps(series["train/workers"]) == [0, 1, 2, 3, 4]  # the purge covers every tag
    # Round 3's evaluation was the first run's; the resumed one has not reached its own yet.
    assert series["eval/test_accuracy"] == [(1, pytest.approx(0.1)), (4, pytest.approx(0.9))]


def test_a_fresh_run_in_the_same_directory_replaces_the_old_one(tmp_path):
    with EventLog(tmp_path) as old:
        _write_rounds(old, range(4), lambda r: 1.0)
        old.add_evaluation(3, {"test_loss": 1.0})
    _age(tmp_path)
    with EventLog(tmp_path) as new:
        _write_rounds(new, range(2), lambda r: 2.0)

    series = _read(tmp_path)
    assert series["train/loss"] == [(0, 2.0), (1, 2.0)]
    assert series.get("eval/test_loss", []) == []


def test_non_finite_figures_are_written_and_missing_ones_skipped(tmp_path):
    with EventLog(tmp_path) as log:
        _write_rounds(log, range(2), lambda r: [1.0, math.nan][r])
        log.add_evaluation(1, {"test_loss": math.inf, "test_accuracy": None})

    series = _read(tmp_path)
    assert _values(series["train/loss"])[0] == 1.0 and math.isnan(_values(series["train/loss"])[1])
    assert series["eval/test_loss"] == [(1, math.inf)]
    assert "eval/test_accuracy" not in series


# ---------------------------------------------------------------- the smoothed loss


def test_smoothing_matches_a_hand_computed_bias_corrected_average():
    # weight 0.5: averages 0.5 x 1 = 0.5 and 0.25 + 0.5 x 2 = 1.25, over the weight gathered, 0.5 and 0.75.
    assert smooth([1.0, 2.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75])


def test_smoothing_keeps_a_constant_and_starts_at_the_first_value():
    assert smooth(np.full(500, 3.25), 0.99) == pytest.approx(np.full(500, 3.25))
    rng = np.random.default_rng(SEED)
    values = rng.uniform(1, 2, 100)
    assert smooth(values, 0.9)[0] == values[0]


def test_smoothing_lags_a_step_change():
    smoothed = smooth([0.0] * 50 + [1.0] * 50, 0.9)
    assert np.all(smoothed[:50] == 0.0)
    assert 0 < smoothed[50] < smoothed[51] < smoothed[60] < 1  # climbs towards the new level, never past it
    assert smoothed[-1] == pytest.approx(1.0, abs=0.01)


def test_smoothing_passes_non_finite_values_and_averages_around_them():
    smoothed = smooth([1.0, math.nan, 1.0], 0.9)
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1]) and smoothed[2] == pytest.approx(1.0)


def test_longer_runs_smooth_over_more_rounds():
    assert smoothing_weight(0) == smoothing_weight(1000) == pytest.approx(0.9)
    assert 0.9 < smoothing_weight(5000) < smoothing_weight(17000) < 1


def _long_loss(rounds: int) -> list[float]:
    rng = np.random.default_rng(SEED)
    return (2.0 * np.exp(-np.arange(rounds) / 4000) + 0.1 + rng.uniform(0, 0.5, rounds)).tolist()


def test_curves_png_for_a_long_run(tmp_path):
    metrics = Metrics(job="long", mode="run", settings={}, loss=_long_loss(17_000))
    metrics.add_evaluation(16_999, {"test_loss": 0.3}, epochs_ended=0)
    plot_curves(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)


def test_dashboard_png_with_a_loss_metrics_json_wrote_as_null(tmp_path):
    loss = _long_loss(3000)
    loss[10] = None  # a NaN round, as metrics.json writes it
    plot_dashboard({"job": "d", "mode": "run", "loss": loss, "round_seconds": [0.1] * 3000}, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes().startswith(PNG)
