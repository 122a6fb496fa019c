"""Gradient compression on the wire: every lossy mode still trains digits to >= 0.95."""

from __future__ import annotations

import json

import pytest

from tests.helpers import role_env, run_pangea


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8", "topk"])
def test_every_compression_mode_trains_digits(nats_url, job, tmp_path, mode):
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--job",
        job,
        "--workers",
        "2",
        "--epochs",
        "20",
        "--compression",
        mode,
        "--topk-fraction",
        "0.1",
        "--out",
        str(out),
        env=role_env(nats_url),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rejected"] == {}
    assert metrics["final_test_accuracy"] >= 0.95, metrics["test_accuracy"]


def test_compressed_chunks_reach_the_average(nats_url, job, tmp_path):
    """int8 over a real run: nothing refused, and the run learns (a fast check in the default run)."""
    out = tmp_path / "run"
    result = run_pangea(
        "run", "--job", job, "--epochs", "3", "--compression", "int8", "--out", str(out), env=role_env(nats_url)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rejected"] == {} and metrics["final_test_accuracy"] > 0.85
