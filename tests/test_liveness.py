"""Liveness from heartbeats and quarantine (pure), and the deadline of a round with no history."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pangea.roles.liveness import Beat, Liveness
from pangea.roles.planning import adaptive_deadline
from pangea.train import plans
from tests.cluster import metrics
from tests.yardstick import assert_verified


def beat(t: float, shards: int = 0, version: int = 0, ready: bool = True, period: float = 1.0) -> Beat:
    return Beat(sent_at=t, shards_done=shards, params_version=version, ready=ready, period=period)


def test_a_member_is_planned_once_ready_and_while_it_beats():
    live = Liveness(overdue_beats=3, slack=0.5)
    live.observe("a", beat(100.0, ready=False), now=0.0)
    assert live.plannable(["a"], 0.0) == [] and live.state("a", 0.0) == "starting"
    live.observe("a", beat(101.0), now=1.0)
    assert live.plannable(["a"], 1.0) == ["a"]
    # The same heartbeat read again and again: it stopped changing.
    for now in (2.0, 3.0, 4.0):
        live.observe("a", beat(101.0), now=now)
    assert live.state("a", 4.4) == "ok" and live.state("a", 4.6) == "overdue"
    live.observe("a", beat(105.0), now=5.0)  # it beats again
    assert live.plannable(["a"], 5.0) == ["a"]


def test_overdue_follows_each_workers_own_period_not_its_clock():
    live = Liveness(overdue_beats=3, slack=0.0)
    live.observe("slow-beats", beat(-1e9, period=5.0), now=0.0)  # its clock is far off: no matter
    live.observe("fast-beats", beat(7.0, period=0.5), now=0.0)
    assert live.plannable(["fast-beats", "slow-beats"], 2.0) == ["slow-beats"]
    assert live.excluded(["fast-beats", "slow-beats"], 2.0) == {"fast-beats": "overdue"}


def test_quarantine_lasts_until_the_heartbeat_shows_progress():
    live = Liveness()
    live.observe("h", beat(1.0, shards=4, version=9), now=0.0)
    assert live.quarantine("h", "missed the deadline of round 9")
    assert not live.quarantine("h", "again")  # already out: one event, not one per round
    assert live.state("h", 0.1) == "quarantined: missed the deadline of round 9"
    # Beating on, but doing nothing: stays out.
    assert live.observe("h", beat(2.0, shards=4, version=9), now=1.0) is None
    assert live.plannable(["h"], 1.0) == []
    # It finished its late shard: back in, with a line saying so.
    back = live.observe("h", beat(3.0, shards=5, version=9), now=2.0)
    assert back and back.startswith("h is back") and live.plannable(["h"], 2.0) == ["h"]


def test_a_restarted_worker_ends_its_quarantine_by_following_the_parameters():
    """A SIGKILLed worker restarted under the same id counts its shards from 0 again: the newer
    parameters it holds are progress (compared as a pair with the old count they never were, and
    the job stalled with every worker quarantined: benchmarks/goodput.py found it)."""
    live = Liveness()
    live.observe("w0", beat(1.0, shards=70, version=71), now=0.0)
    live.quarantine("w0", "missed the deadline of round 71")
    assert live.observe("w0", beat(2.0, shards=0, version=71), now=1.0) is None  # restarted, nothing new yet
    back = live.observe("w0", beat(3.0, shards=0, version=75), now=2.0)
    assert back and live.plannable(["w0"], 2.0) == ["w0"]


def test_a_member_whose_key_expired_starts_afresh():
    live = Liveness()
    live.observe("x", beat(1.0), now=0.0)
    live.quarantine("x", "missed the deadline of round 1")
    live.forget_all_but(set())
    assert live.state("x", 0.0) == "gone"
    live.observe("x", beat(50.0), now=30.0)  # a new key: restarted, or back after a partition
    assert live.plannable(["x"], 30.0) == ["x"]


def test_round_zero_deadline_comes_from_the_shards_in_hand_not_the_cap():
    assert adaptive_deadline([], 3.0, 2.0, 60.0) == 60.0  # nothing to go on yet
    assert adaptive_deadline([], 3.0, 2.0, 60.0, arrived=[0.02]) == 2.0  # the floor
    assert adaptive_deadline([], 3.0, 2.0, 60.0, arrived=[1.0, 3.0, 5.0]) == 9.0  # factor x median
    assert adaptive_deadline([], 3.0, 2.0, 60.0, arrived=[40.0]) == 60.0  # the cap
    assert adaptive_deadline([0.5], 3.0, 2.0, 60.0, arrived=[40.0]) == 2.0  # history wins


# ---------------------------------------------------------------- over a real nats-server


def _reassigned_from(m: dict, worker: str) -> list[dict]:
    return [e for e in m["events"] if e["kind"] == "reassign" and f" of {worker} (" in e["detail"]]


def test_a_member_that_beats_but_never_computes_does_not_stall_the_job(cluster, tmp_path):
    """`hung` is ready (a consumer, parameters) and heartbeats normally, but sleeps for ever on its
    first shard, as a hung GPU would.  Round 0 waits one deadline derived from the shard that
    did arrive (not the 60 s cap), re-issues, quarantines `hung`; no later round plans it."""
    out = tmp_path / "run"
    cluster.worker("w0")
    cluster.worker("hung", test_delay=1e6)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "2", "--epochs", "2", "--out", str(out))
    cluster.wait("orch", timeout=300)
    m = metrics(out)
    assert 1 <= len(_reassigned_from(m, "hung")) <= 2, m["events"]
    assert m["workers"].count(2) <= 2, m["workers"]  # planned into at most two rounds in all
    quarantines = [e for e in m["events"] if e["kind"] == "quarantine"]
    assert len(quarantines) == 1 and quarantines[0]["detail"].startswith("hung quarantined: missed the deadline")
    counted = {w for r in plans.read_jsonl(out / "plans.jsonl") for s in r.shards for w in s.workers}
    assert counted == {"w0"}
    assert sum(m["samples"]) == 2 * 1348
    assert_verified(out)


@pytest.mark.slow
def test_a_worker_whose_heartbeats_stop_is_left_out_until_they_resume(cluster, tmp_path):
    """SIGSTOP a worker for twice the member TTL, then SIGCONT: at most one round waits for it,
    no round is planned with it while it is stopped, and it is planned in again after."""
    out = tmp_path / "run"
    for w in ("w0", "w1", "w2"):
        cluster.worker(w, test_delay=0.05)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "3", "--epochs", "6", "--batch-size", "32", "--out", str(out))
    stopped_at = cluster.wait_for_round(10)
    pid = cluster.procs["w2"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2 * 3)  # twice the Cluster's PANGEA_MEMBER_TTL
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = cluster.wait_for_round(0)
    cluster.wait("orch", timeout=400)
    m = metrics(out)
    # A round that waited for it re-issued its shard later; the next round, planned ahead while
    # it still beat, re-issues its shard when it opens, before any wait (not counted).
    waited = [e for e in _reassigned_from(m, "w2") if "(not plannable since it was planned)" not in e["detail"]]
    assert len(waited) <= 1, m["events"]
    records = plans.read_jsonl(out / "plans.jsonl")
    with_w2 = [r.round for r in records if any("w2" in s.workers for s in r.shards)]
    assert with_w2 and with_w2[0] == 0
    gap = [r for r in range(stopped_at + 2, resumed_at) if r in with_w2]
    assert not gap, f"w2 counted in rounds {gap} while it was stopped"
    assert with_w2[-1] > resumed_at, "w2 was never planned in again after SIGCONT"
    assert resumed_at < len(records) - 5, "the run ended too soon after SIGCONT to tell"
    assert_verified(out)
