"""Elastic membership over a real nats-server: joins, deaths, stragglers, scaling, replay, status."""

from __future__ import annotations

import json
import signal

import pytest

from pangea.train.outputs import load_params, max_abs_diff
from tests.cluster import metrics
from tests.helpers import role_env, run_pangea, wait_for_log
from tests.yardstick import TOLERANCE, assert_verified


def test_worker_killed_then_new_worker_joins(cluster, tmp_path):
    """3 workers; one SIGKILLed around round 5, a new one joins around round 10; still exact."""
    out = tmp_path / "run"
    for i in range(3):
        cluster.worker(f"w{i}", test_delay=0.15)
    cluster.start("pre", "preprocessor")
    cluster.start(
        "orch",
        "orchestrator",
        "--workers",
        "3",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--seed",
        "11",
    )
    cluster.wait_for_round(4)
    cluster.signal("w2", signal.SIGKILL)
    cluster.wait_for_round(9)
    cluster.worker("w3", test_delay=0.15)
    cluster.wait("orch")
    assert_verified(out)
    kinds = {(e["kind"], e["detail"].split()[0]) for e in metrics(out)["events"]}
    log = cluster.log("orch")
    assert any(k == "reassign" for k, _ in kinds), log[-3000:]
    # Whichever comes first: its heartbeats overdue, the round's deadline, or its key expiring.
    why = ("its heartbeats stopped", "missed the deadline", "left the job")
    assert "shard" in log and any(f"of w2 ({reason})" in log for reason in why), log[-3000:]
    assert ("join", "joined:") in kinds and "joined: w3" in log
    assert metrics(out)["workers"][-1] == 3  # w0, w1, w3 at the end
    assert sum(metrics(out)["samples"]) == 2 * 1348  # every sample once per epoch


@pytest.mark.slow  # ~30 s; every run's start goes through the same wait
def test_a_new_job_starts_once_its_preprocessor_has_its_data(cluster, tmp_path):
    """Workers ready and no preprocessor: the orchestrator waits, and says so, without planning
    round 0 (whose time and deadline would count the preprocessor's start-up); then it runs exactly."""
    out = tmp_path / "run"
    for i in range(2):
        cluster.worker(f"w{i}")
    cluster.start("orch", "orchestrator", "--workers", "2", "--out", str(out), "--epochs", "1", "--seed", "5")
    wait_for_log(tmp_path / "orch.log", "waiting for the preprocessor")
    assert "starting at round 0" not in cluster.log("orch")
    assert not (out / "plans.jsonl").exists() or not (out / "plans.jsonl").read_text().strip()
    cluster.start("pre", "preprocessor")
    cluster.wait("orch")
    assert "starting at round 0 with 2 workers" in cluster.log("orch")
    assert_verified(out)
    assert sum(metrics(out)["samples"]) == 1348  # every sample once


@pytest.mark.parametrize("policy", ["exact", pytest.param("quorum", marks=pytest.mark.slow)])
def test_straggler(cluster, tmp_path, policy):
    """One worker 2 s slower than the deadline: exact re-issues its shard, quorum drops it."""
    out = tmp_path / "run"
    cluster.worker("fast0")
    cluster.worker("fast1")
    cluster.worker("slow", test_delay=2.0)
    cluster.start("pre", "preprocessor")
    cluster.start(
        "orch",
        "orchestrator",
        "--workers",
        "3",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--seed",
        "2",
        "--policy",
        policy,
        "--straggler-deadline",
        "0.5",
    )
    cluster.wait("orch")
    m = metrics(out)
    if policy == "exact":
        assert_verified(out)
        assert sum(m["samples"]) == 1348 and not m["quorum_rounds"]
        assert any("missed the deadline" in e["detail"] for e in m["events"])
    else:
        assert m["quorum_rounds"], m["events"]
        for q in m["quorum_rounds"]:
            assert q["samples"] < q["planned"]
            assert m["samples"][q["round"]] == q["samples"]
        assert sum(m["samples"]) < 1348


@pytest.mark.slow
def test_scale_up_to_four_and_back_to_one(cluster, tmp_path):
    out = tmp_path / "run"
    cluster.worker("w0", test_delay=0.03)
    cluster.start("pre", "preprocessor")
    cluster.start(
        "orch",
        "orchestrator",
        "--workers",
        "1",
        "--out",
        str(out),
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--seed",
        "4",
    )
    cluster.wait_for_round(5)
    for i in (1, 2, 3):
        cluster.worker(f"w{i}", test_delay=0.03)
    planned = cluster.wait_for_planned("w0", "w1", "w2", "w3")  # joined and ready: start-up takes seconds
    cluster.wait_for_round(planned + 5)
    for i in (1, 2, 3):
        cluster.signal(f"w{i}", signal.SIGTERM)  # graceful: leave after the shard in hand
    cluster.wait("orch")
    for i in (1, 2, 3):
        assert cluster.wait(f"w{i}") in (0, 143)
        assert f"worker w{i} leaving after its current shard" in cluster.log(f"w{i}")
    assert_verified(out)
    workers = metrics(out)["workers"]
    assert max(workers) == 4 and workers[0] == 1 and workers[-1] == 1


@pytest.mark.slow
def test_replay_reproduces_the_run(nats_url, job, tmp_path):
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--job",
        job,
        "--workers",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "40",
        "--seed",
        "9",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--out",
        str(out),
        env=role_env(nats_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    original = load_params(out / "params.npz")
    assert_verified(out)
    for workers in (2, 3):
        replay_out = tmp_path / f"replay{workers}"
        result = run_pangea(
            "replay", "--job", job, "--workers", str(workers), "--out", str(replay_out), env=role_env(nats_url)
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert_verified(replay_out)
        m = metrics(replay_out)
        assert m["settings"]["source_job"] == job and m["settings"]["optimizer"] == "adam"
        assert len(m["loss"]) == len(metrics(out)["loss"])
    # From a later round: starts at the original's checkpoint of round 20 (one every 10 rounds).
    late = tmp_path / "replay-late"
    result = run_pangea("replay", "--job", job, "--from-round", "25", "--out", str(late), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_verified(late)  # rounds 0-19 as the original recorded them, then the replay's
    m = metrics(late)
    assert len(m["loss"]) == len(metrics(out)["loss"])
    assert any(e["kind"] == "replay" and "round 20" in e["detail"] for e in m["events"]), m["events"]
    assert set(m["workers"]) == {2}, m["events"]  # a replay's first round waits for its --workers
    too_early = run_pangea(
        "replay", "--job", job, "--from-round", "5", "--out", str(tmp_path / "x"), env=role_env(nats_url)
    )
    assert too_early.returncode == 2 and "no checkpoint at or before round 5" in too_early.stderr
    # With the same K the same shards meet the same kernels, and a float64 sum of two terms
    # does not depend on their order: a replay from round 0 is bit-identical by construction.
    params = load_params(tmp_path / "replay2" / "params.npz")
    assert all((params[k] == original[k]).all() for k in original), "replay2 differs from the run"
    # From a checkpoint: within the yardstick's tolerance of the run, not always bit for bit.
    # Once in CI (8.2e-7, K=2 in every round, same kernels) the losses parted at the first step
    # after the restore, though restoring the same checkpoint in one process steps bit for bit;
    # the cause is not found yet (see the note of that stop).  Both verify against their plans.
    late_params = load_params(late / "params.npz")
    assert max_abs_diff(late_params, original) <= TOLERANCE, "replay-late is not within tolerance of the run"


def test_replay_of_an_unknown_job_is_one_line(nats_url, tmp_path):
    result = run_pangea("replay", "--job", "no-such-job", env=role_env(nats_url), cwd=tmp_path)
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_status_lists_members_and_backlog(cluster, tmp_path, nats_url, job):
    out = tmp_path / "run"
    cluster.worker("s0", test_delay=0.05)
    cluster.worker("s1", test_delay=0.05)
    cluster.start("pre", "preprocessor")
    cluster.start("orch", "orchestrator", "--workers", "2", "--max-workers", "3", "--out", str(out), "--epochs", "2")
    cluster.wait_for_round(3)
    result = run_pangea("status", "--job", job, "--json", env=role_env(nats_url))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {m["id"] for m in status["members"]} == {"s0", "s1"}
    for m in status["members"]:
        assert m["backlog"] is not None and m["unacked"] is not None and m["heartbeat_age_seconds"] < 3
        assert m["state"] == "ok", m
    assert status["rounds_done"] >= 4 and not status["finished"] and status["recent_round_seconds"]
    assert status["samples_per_second"] > 0
    assert status["workers"]["present"] == 2 and status["workers"]["desired"] in (2, 3), status["workers"]
    table = run_pangea("status", "--job", job, env=role_env(nats_url))
    assert table.returncode == 0 and "s0" in table.stdout and "backlog" in table.stdout
    assert "2 present" in table.stdout and "desired" in table.stdout
    cluster.wait("orch")
    status = json.loads(run_pangea("status", "--job", job, "--json", env=role_env(nats_url)).stdout)
    assert status["finished"] and status["rounds_done"] == status["total_rounds"]
    # The autoscaling signal: 5 rounds measured on 2 workers, then a third is asked for (and
    # waited for: nobody starts one here); once the job is over, none.
    desired = json.loads((out / "metrics.json").read_text())["desired_workers"]
    assert desired[:4] == [2] * 4 and set(desired[4:]) == {3}, desired
    assert status["workers"] == {"desired": 0, "present": status["workers"]["present"], "why": "the job is finished"}


@pytest.mark.slow
def test_a_replay_carries_every_setting_of_its_job(nats_url, job, tmp_path):
    """The spec carries each training and aggregation setting under its own name, so a replay
    trains as its job did: compression, a robust aggregator, a learning rate and a schedule."""
    out = tmp_path / "run"
    flags = [
        "--workers",
        "3",
        "--epochs",
        "1",
        "--compression",
        "int8",
        "--aggregator",
        "trimmed-mean",
        "--lr",
        "0.03",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "3",
        "--batch-size",
        "96",
    ]
    result = run_pangea("run", "--job", job, "--out", str(out), *flags, env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-3000:]
    replay = tmp_path / "replay"
    result = run_pangea("replay", "--job", job, "--workers", "3", "--out", str(replay), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-3000:]
    original, again = metrics(out)["settings"], metrics(replay)["settings"]
    from pangea.roles.jobspec import CARRIED

    differ = {k: (original[k], again[k]) for k in CARRIED if original[k] != again[k]}
    assert not differ, differ
    assert again["source_job"] == job and again["compression"] == "int8" and again["aggregator"] == "trimmed-mean"


def test_the_job_spec_carries_every_training_setting():
    """No training setting can be added without the spec (and so a replay) carrying it."""
    from pangea.roles.jobspec import CARRIED, settings_from_spec, spec_from_settings
    from pangea.settings import OrchestratorSettings, TrainSettings

    # hidden, vocab and val_dataset are converted, not dropped; code_dir is a path on the orchestrator's machine
    # (what it names travels by its hash in the model, step or optimizer spec).
    assert set(TrainSettings.model_fields) - set(CARRIED) == {"hidden", "vocab", "code_dir", "val_dataset"}
    assert {"aggregator", "byzantine", "clip_norm", "policy", "shards"} <= set(CARRIED)
    settings = OrchestratorSettings(job="j", lr=0.123, hidden="7,5", compression="fp16", mode="diloco", outer_lr=0.3)
    spec = spec_from_settings(
        settings,
        "orchestrator",
        input_shape=(64,),
        num_classes=10,
        num_params=1,
        layout_hash="h",
        total_rounds=3,
        vocab=0,
    )
    from pangea.wire import codec
    from pangea.wire.messages import JobSpec

    back = settings_from_spec(codec.decode(codec.encode(spec), JobSpec))  # through Cap'n Proto
    assert back["hidden"] == "7,5" and all(back[k] == getattr(settings, k) for k in CARRIED)
