"""Elastic membership over a real nats-server: joins, deaths, stragglers, scaling, replay, status."""

from __future__ import annotations

import json
import signal

import pytest

from pangea.outputs import load_params
from tests.cluster import Cluster, metrics
from tests.conftest import role_env, run_pangea
from tests.test_e2e import assert_exact, reference


@pytest.fixture
def cluster(nats_url, job, tmp_path):
    c = Cluster(nats_url, job, tmp_path)
    yield c
    c.close()


def test_worker_killed_then_new_worker_joins(cluster, tmp_path):
    """3 workers; one SIGKILLed around round 5, a new one joins around round 10; still exact."""
    train = dict(epochs=1, batch_size=64, seed=11)
    out = tmp_path / "run"
    for i in range(3):
        cluster.worker(f"w{i}", test_delay=0.15)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "3", "--out", str(out), "--epochs", "1", "--batch-size", "64",
                  "--seed", "11")
    cluster.wait_for_round(4)
    cluster.signal("w2", signal.SIGKILL)
    cluster.wait_for_round(9)
    cluster.worker("w3", test_delay=0.15)
    cluster.wait("orch")
    assert_exact(out, reference(tmp_path / "ref", **train))
    kinds = {(e["kind"], e["detail"].split()[0]) for e in metrics(out)["events"]}
    log = cluster.log("orch")
    assert any(k == "reassign" for k, _ in kinds), log[-3000:]
    assert "shard" in log and "of w2 (left the job)" in log
    assert ("join", "joined:") in kinds and "joined: w3" in log
    assert metrics(out)["workers"][-1] == 3  # w0, w1, w3 at the end
    assert sum(metrics(out)["samples"]) == 1348  # every sample once


@pytest.mark.parametrize("policy", ["exact", "quorum"])
def test_straggler(cluster, tmp_path, policy):
    """One worker 2 s slower than the deadline: exact re-issues its shard, quorum drops it."""
    out = tmp_path / "run"
    cluster.worker("fast0")
    cluster.worker("fast1")
    cluster.worker("slow", test_delay=2.0)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "3", "--out", str(out), "--epochs", "1", "--batch-size", "256",
                  "--seed", "2", "--policy", policy, "--straggler-deadline", "0.5")
    cluster.wait("orch")
    m = metrics(out)
    if policy == "exact":
        assert_exact(out, reference(tmp_path / "ref", epochs=1, batch_size=256, seed=2))
        assert sum(m["samples"]) == 1348 and not m["quorum_rounds"]
        assert any("missed the deadline" in e["detail"] for e in m["events"])
    else:
        assert m["quorum_rounds"], m["events"]
        for q in m["quorum_rounds"]:
            assert q["samples"] < q["planned"]
            assert m["samples"][q["round"]] == q["samples"]
        assert sum(m["samples"]) < 1348


def test_scale_up_to_four_and_back_to_one(cluster, tmp_path):
    out = tmp_path / "run"
    cluster.worker("w0", test_delay=0.03)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "1", "--out", str(out), "--epochs", "3", "--batch-size", "32",
                  "--seed", "4")
    cluster.wait_for_round(5)
    for i in (1, 2, 3):
        cluster.worker(f"w{i}", test_delay=0.03)
    cluster.wait_for_round(60)
    for i in (1, 2, 3):
        cluster.signal(f"w{i}", signal.SIGTERM)  # graceful: leave after the shard in hand
    cluster.wait("orch")
    for i in (1, 2, 3):
        assert cluster.wait(f"w{i}") in (0, 143)
        assert f"worker w{i} leaving after its current shard" in cluster.log(f"w{i}")
    assert_exact(out, reference(tmp_path / "ref", epochs=3, batch_size=32, seed=4))
    workers = metrics(out)["workers"]
    assert max(workers) == 4 and workers[0] == 1 and workers[-1] == 1


@pytest.mark.slow
def test_replay_reproduces_the_run(nats_url, job, tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--job", job, "--workers", "2", "--epochs", "2", "--batch-size", "40", "--seed", "9",
                        "--optimizer", "adam", "--lr", "0.003", "--out", str(out), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-3000:]
    original = load_params(out / "params.npz")
    for workers in (2, 3):
        replay_out = tmp_path / f"replay{workers}"
        result = run_pangea("replay", "--job", job, "--workers", str(workers), "--out", str(replay_out),
                            env=role_env(nats_url))
        assert result.returncode == 0, result.stderr[-3000:]
        assert_exact(replay_out, original)
        m = metrics(replay_out)
        assert m["settings"]["source_job"] == job and m["settings"]["optimizer"] == "adam"
        assert len(m["loss"]) == len(metrics(out)["loss"])
    # From a later round: starts at the original's checkpoint of round 20 (one every 10 rounds).
    late = tmp_path / "replay-late"
    result = run_pangea("replay", "--job", job, "--from-round", "25", "--out", str(late), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact(late, original)
    m = metrics(late)
    assert len(m["loss"]) == len(metrics(out)["loss"])
    assert any(e["kind"] == "replay" and "round 20" in e["detail"] for e in m["events"]), m["events"]
    too_early = run_pangea("replay", "--job", job, "--from-round", "5", "--out", str(tmp_path / "x"),
                           env=role_env(nats_url))
    assert too_early.returncode == 2 and "no checkpoint at or before round 5" in too_early.stderr
    same_k = load_params(tmp_path / "replay2" / "params.npz")
    bit_identical = all((same_k[k] == original[k]).all() for k in original)
    print(f"replay with the same K bit-identical: {bit_identical}")


def test_replay_of_an_unknown_job_is_one_line(nats_url, tmp_path):
    result = run_pangea("replay", "--job", "no-such-job", env=role_env(nats_url), cwd=tmp_path)
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_lists_members_and_backlog(cluster, tmp_path, nats_url, job):
    out = tmp_path / "run"
    cluster.worker("s0", test_delay=0.05)
    cluster.worker("s1", test_delay=0.05)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "2", "--out", str(out), "--epochs", "2")
    cluster.wait_for_round(3)
    result = run_pangea("status", "--job", job, "--json", env=role_env(nats_url))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {m["id"] for m in status["members"]} == {"s0", "s1"}
    for m in status["members"]:
        assert m["backlog"] is not None and m["unacked"] is not None and m["heartbeat_age_seconds"] < 3
    assert status["rounds_done"] >= 4 and not status["finished"] and status["recent_round_seconds"]
    table = run_pangea("status", "--job", job, env=role_env(nats_url))
    assert table.returncode == 0 and "s0" in table.stdout and "backlog" in table.stdout
    cluster.wait("orch")
    status = json.loads(run_pangea("status", "--job", job, "--json", env=role_env(nats_url)).stdout)
    assert status["finished"] and status["rounds_done"] == status["total_rounds"]
