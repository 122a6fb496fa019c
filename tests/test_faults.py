"""Faults: the NATS server restarted mid-run, and checkpoints that outlive the run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from pangea.bus.server import EmbeddedServer
from pangea.train.data import load_dataset
from pangea.train.models import build_model
from pangea.train.tasks import get_task
from tests.cluster import Cluster, metrics
from tests.helpers import role_env, run_pangea, start_run
from tests.yardstick import assert_verified


def test_nats_server_restart_mid_run(job, tmp_path):
    """kill -9 the server mid-run and start it again on the same store: every role reconnects
    and the run ends with exact parameters."""
    server = EmbeddedServer(tmp_path / "store", log_file=tmp_path / "nats.log").start()
    try:
        out = tmp_path / "run"
        proc = start_run(
            out, job, server.url, "--workers", "2", "--epochs", "3", "--batch-size", "32", "--seed", "6", member_ttl=5
        )
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
        assert_verified(out)
        assert "reconnected to NATS" in (out / "logs" / "orchestrator.log").read_text()
    finally:
        server.stop()


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
