"""Faults: the NATS server restarted mid-run, and checkpoints that outlive the run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pangea.bus.server import EmbeddedServer
from pangea.train.data import load_dataset, steps_per_epoch
from pangea.train.models import build_model
from pangea.train.tasks import get_task
from tests.cluster import Cluster, metrics
from tests.helpers import role_env, run_pangea, start_run
from tests.yardstick import assert_verified


def _server_restarted_mid_run(job: str, tmp_path, *flags: str) -> dict:
    """kill -9 the server at round 20 of a run and start it again on the same store; the run's
    metrics, once it ended well and restored the streams the server lost once."""
    server = EmbeddedServer(tmp_path / "store", log_file=tmp_path / "nats.log").start()
    try:
        out = tmp_path / "run"
        proc = start_run(
            out, job, server.url, "--workers", "2", "--epochs", "3", "--batch-size", "32", "--seed", "6", *flags,
            member_ttl=5,
        )  # fmt: skip
        try:
            Cluster(server.url, job, tmp_path).wait_for_round(20)
            server.kill()
            time.sleep(1.5)
            server.restart()
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr[-3000:]
        assert "reconnected to NATS" in (out / "logs" / "orchestrator.log").read_text()
        run = metrics(out)
        restored = [e for e in run["events"] if e["kind"] == "restore"]
        assert len(restored) == 1, run["events"]
        assert "the consumer of pangea." in restored[0]["detail"]
        return run
    finally:
        server.stop()


def test_nats_server_restart_mid_run(job, tmp_path):
    """Every role reconnects, the gradient and parameter streams the server kept in memory (the
    default) are created again, the round in hand is asked again, and the run ends with exact
    parameters."""
    _server_restarted_mid_run(job, tmp_path)
    assert_verified(tmp_path / "run")


@pytest.mark.slow
def test_a_restarted_server_and_orchestrator_shards(job, tmp_path):
    """With --shards 2 the shard's mean slice, stored before the restart and lost with it, is
    stored again; the run is exact."""
    _server_restarted_mid_run(job, tmp_path, "--shards", "2")
    assert_verified(tmp_path / "run")


@pytest.mark.slow
def test_a_restarted_server_in_async_mode(job, tmp_path):
    """Async: every global batch in hand is given again, and each is applied or refused once."""
    run = _server_restarted_mid_run(job, tmp_path, "--mode", "async", "--staleness", "4")
    assert len(run["loss"]) == 3 * steps_per_epoch(1348, 32)
    assert run["final_test_accuracy"] >= 0.9, run["test_accuracy"]


@pytest.mark.slow
def test_exported_checkpoint_loads_and_gives_the_reported_accuracy(nats_url, job, tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--job", job, "--epochs", "2", "--out", str(out), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr[-2000:]
    exported = tmp_path / "model.pt"
    result = run_pangea("checkpoint", "export", "--job", job, "--out", str(exported), env=role_env(nats_url))
    assert result.returncode == 0, result.stderr
    state = torch.load(exported, weights_only=True)
    digits = load_dataset("digits")
    model = build_model("mlp", digits.input_shape, digits.num_classes, (128,), seed=123)  # other init
    model.load_state_dict(state)
    accuracy = get_task("classify").evaluate(model, digits)["test_accuracy"]
    assert accuracy == metrics(out)["final_test_accuracy"]
    with np.load(out / "params.npz") as params:
        for name, tensor in state.items():
            np.testing.assert_array_equal(tensor.numpy(), params[name])


@pytest.mark.slow
def test_resume_needs_the_flag(nats_url, job, tmp_path):
    """Reusing a job name by accident is refused in one line; --resume continues the job."""
    first = run_pangea("run", "--job", job, "--epochs", "1", "--out", str(tmp_path / "a"), env=role_env(nats_url))
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_pangea(
        "orchestrator", "--job", job, "--epochs", "1", "--out", str(tmp_path / "b"), env=role_env(nats_url)
    )
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_pangea(
        "run", "--job", job, "--epochs", "1", "--resume", "true", "--out", str(tmp_path / "c"), env=role_env(nats_url)
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_verified(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["events"][-1]["kind"] == "resume"
