"""Smoke test of `python -m benchmarks.train --quick`: the rows come out, with finite positive
numbers on both sides (never a speed: benchmarks measure, tests assert); and a DDP run that hangs
or loses a rank fails its row in one line instead of hanging the table."""

from __future__ import annotations

import math
import os
import signal
import threading

import pytest

from benchmarks import sides, train
from benchmarks.lab import Workload


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


def _workload(epochs: int) -> Workload:
    train_settings = {"dataset": "digits", "hidden": "16", "epochs": epochs, "batch_size": 64, "seed": 0}
    return Workload("hang", train_settings, "test_accuracy", 2.0, True, timeout=60)


def test_a_rank_that_never_finishes_fails_its_row_at_the_deadline(tmp_path):
    """World 2 with one rank started: rank 0 waits in gloo's rendezvous (600 s in ddp_rank) for a
    rank that never comes, as a rank did after a fork-after-threads hang. The deadline ends the
    run in one line and kills it."""
    config = sides.ddp_config(_workload(1), 2, tmp_path)

    failed = sides.run_ddp_ranks(config, 1, timeout=5)

    assert failed == "stopped after 5 s: rank 0 had not finished"
    assert "\n" not in failed


@pytest.mark.slow  # the deadline test above keeps a failing DDP run in the default run
def test_a_killed_rank_ends_the_run_at_once_and_no_rank_is_left(tmp_path):
    """Rank 1 SIGKILLed mid-run: rank 0 would wait in gloo's all-reduce for its 600 s timeout;
    the run ends at the first failed rank, long before the deadline, with rank 0 killed."""
    config = sides.ddp_config(_workload(10_000), 2, tmp_path, checkpoint=str(tmp_path / "ckpt"))
    pids: dict[int, int] = {}

    def kill_rank_1() -> None:
        pid_file = tmp_path / "ckpt" / "rank1.pid"
        for _ in range(600):  # ranks write their pid once their group is up
            if pid_file.exists() and pid_file.read_text():
                for rank in (0, 1):
                    pids[rank] = int((tmp_path / "ckpt" / f"rank{rank}.pid").read_text())
                os.kill(pids[1], signal.SIGKILL)
                return
            threading.Event().wait(0.1)

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    failed = sides.run_ddp_ranks(config, 2, timeout=240)
    killer.join()

    assert failed.startswith("rank 1 exited -9"), failed
    with pytest.raises(ProcessLookupError):  # rank 0 was killed and reaped
        os.kill(pids[0], 0)
