"""The benchmarks' clock reads the orchestrator's log; the lab benchmark: its notes name the first side, and
(slow) its quick rows run on the lab with sane numbers.  What it measures is never asserted."""

from __future__ import annotations

import pytest

from benchmarks import lab as bench
from benchmarks.common import log_clock
from tests.netlab import unavailable

LOG = """\
2026-12-02 00:35:53,420 INFO    [orchestrator] pangea.roles.orchestrator: job j: mlp on digits
2026-12-02 00:35:54,000 INFO    [orchestrator] pangea.roles.orchestrator: starting at round 0 with 4 workers: w0, w1, w2, w3
2026-12-02 00:35:56,500 INFO    [orchestrator] pangea.roles.orchestrator: round 22/220 (epoch 1): loss 0.9685, test accuracy 0.8597, test loss 0.5964
2026-12-02 00:35:58,250 INFO    [orchestrator] pangea.roles.orchestrator: round 44/220 (epoch 2): loss nan, bits per byte 2.9000
"""
ASYNC_LOG = """\
2026-12-02 00:35:54,000 INFO    [orchestrator] pangea.roles.orchestrator: starting at round 0 with 2 workers: w0, w1
2026-12-02 00:35:55,125 INFO    [orchestrator] pangea.roles.asynchronous: epoch 1 done (23/230 global batches, version 22): test_accuracy 0.8200
"""


def test_the_clock_reads_every_evaluation_of_the_orchestrator_log():
    assert log_clock(LOG) == [
        (2.5, {"round": 22, "test_accuracy": 0.8597, "test_loss": 0.5964}),
        (4.25, {"round": 44, "bits_per_byte": 2.9}),
    ]
    assert log_clock(ASYNC_LOG) == [(1.125, {"round": 23, "test_accuracy": 0.82})]
    assert log_clock("no start line") == []


def test_diloco_rows_run_their_inner_steps_at_the_workloads_rate_without_outer_warmup():
    settings = bench.pangea_settings(bench.LM, bench.SIDES[2])
    assert settings["mode"] == "diloco" and settings["local_steps"] == 20
    assert settings["inner_lr"] == bench.LM.train["lr"] and settings["warmup_steps"] == 0
    assert bench.pangea_settings(bench.LM, bench.SIDES[1])["warmup_steps"] == bench.LM.train["warmup_steps"]


def _row(side: str, seconds):
    return {"workload": "w", "link": "50mbit", "side": side, "time to target s": seconds}


def test_the_notes_name_the_first_side_and_the_ratio():
    assert bench.notes([_row("ddp", 10.0), _row("pangea sync", 30.0), _row("pangea int8", 20.0)]) == [
        "w, 50mbit: DDP first (10.0 s); Pangea's fastest, pangea int8, takes 2.00x as long"
    ]
    assert bench.notes([_row("ddp", 10.0), _row("pangea diloco H=20", 4.0)]) == [
        "w, 50mbit: pangea diloco H=20 first (4.0 s), 2.50x faster than DDP (10.0 s)"
    ]
    assert bench.notes([_row("ddp", "not reached"), _row("pangea sync", "not reached")]) == [
        "w, 50mbit: no side reached the target"
    ]


@pytest.mark.slow
def test_quick_rows_on_the_lab():
    reason = unavailable()
    if reason:
        pytest.skip(f"no network lab on this machine: {reason}")
    rows = bench.run([bench.QUICK], ("1gbit",), None, bench.SIDES[:2])
    assert [r["side"] for r in rows] == ["ddp", "pangea sync"]
    for r in rows:
        assert isinstance(r["time to target s"], float) and r["time to target s"] > 0, r
        assert r["MB up per worker link"] > 0 and r["MB down per worker link"] > 0, r
    assert rows[1]["hub link MB"] > rows[0]["hub link MB"]  # Pangea goes through the hub, DDP does not
