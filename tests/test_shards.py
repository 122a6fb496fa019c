"""Orchestrator shards (`--shards S`): exact against the reference, and the orchestrator's
intake of the shards' averaged slices refuses what does not belong to the round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pangea.errors import Rejected
from pangea.roles.slices import Slices, shard_name
from pangea.settings import OrchestratorSettings, SettingsError, load
from pangea.wire import codec
from pangea.wire.chunking import bounds
from pangea.wire.messages import Chunk, Gradient, RoundPlan, Shard, Tensor
from tests.helpers import kill_mid_run, role_env, run_pangea
from tests.yardstick import assert_exact, assert_verified, reference


@pytest.mark.parametrize(
    ("workers", "shards", "compression"),
    [
        (3, 2, "none"),
        pytest.param(2, 3, "none", marks=pytest.mark.slow),
    ],
)
def test_sharded_run_equals_reference(nats_url, job, tmp_path, workers, shards, compression):
    out = tmp_path / "run"
    result = run_pangea(
        "run",
        "--workers",
        str(workers),
        "--shards",
        str(shards),
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--seed",
        "5",
        "--job",
        job,
        "--out",
        str(out),
        "--compression",
        compression,
        env=role_env(nats_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact(out, reference(tmp_path / "ref", workers=workers, epochs=2, batch_size=50, seed=5))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rejected"] == {}
    assert sum(metrics["samples"]) == 2 * 1348
    for shard in range(1, shards):  # each shard process averaged every round
        log = (out / "logs" / f"shard-{shard}.log").read_text()
        assert f"orchestrator shard {shard} done: {len(metrics['loss'])} rounds, rejected {{}}" in log


def test_shards_refuse_robust_aggregators_in_one_line():
    with pytest.raises(SettingsError, match="--shards"):
        load(OrchestratorSettings, shards=2, aggregator="median")
    with pytest.raises(SettingsError, match="policy"):
        load(OrchestratorSettings, shards=2, policy="quorum")


PLAN = RoundPlan("j", "orchestrator", 4, 0, 4, 6, (Shard("w0", 0, 3), Shard("w1", 3, 6)))


def _slice(
    shard: int,
    values: np.ndarray,
    *,
    round_: int = 4,
    sender: str | None = None,
    samples: int = 6,
    generation: int = 0,
    job: str = "j",
    total: int | None = None,
) -> bytes:
    chunk = Chunk(0, 1, 0, values.size if total is None else total)
    return codec.encode(
        Gradient(
            job,
            sender or shard_name(shard),
            round_,
            shard,
            samples,
            0.3,
            round_,
            chunk,
            Tensor.from_numpy(values, "grad"),
            generation,
        )
    )


def test_slices_join_the_shards_means_after_our_own():
    slices = Slices(10, 3)
    slices.new_round(4)
    parts = [np.arange(*bounds(10, 3, s), dtype=np.float32) for s in range(3)]
    assert not slices.complete and slices.missing_names() == ["shard-1", "shard-2"]
    slices.add(PLAN, 0, _slice(2, parts[2]), 1 << 20)
    assert slices.missing_names() == ["shard-1"]
    slices.add(PLAN, 0, _slice(1, parts[1]), 1 << 20)
    assert slices.complete
    np.testing.assert_array_equal(slices.join(parts[0]), np.arange(10, dtype=np.float32))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00garbage", "malformed"),
        (_slice(1, np.ones(3, np.float32), round_=3), "stale_round"),
        (_slice(1, np.ones(3, np.float32), round_=5), "future_round"),
        (_slice(1, np.ones(3, np.float32), generation=1), "stale_generation"),
        (_slice(1, np.ones(3, np.float32), job="other"), "wrong_job"),
        (_slice(1, np.ones(3, np.float32), sender="w0"), "unknown_sender"),
        (_slice(3, np.ones(3, np.float32)), "unknown_sender"),
        (_slice(1, np.ones(3, np.float32), samples=5), "wrong_samples"),
        (_slice(1, np.ones(3, np.float64)), "wrong_dtype"),
        (_slice(1, np.array([1, np.nan, 1], np.float32)), "non_finite"),
        (_slice(1, np.ones(4, np.float32)), "wrong_shape"),
        (_slice(1, np.ones(3, np.float32), total=9), "wrong_shape"),
    ],
)
def test_slices_refuse_what_does_not_belong_to_the_round(payload, reason):
    slices = Slices(10, 3)
    slices.new_round(4)
    with pytest.raises(Rejected) as refusal:
        slices.add(PLAN, 0, payload, 1 << 20)
    assert refusal.value.reason == reason, refusal.value
    assert slices.missing_names() == ["shard-1", "shard-2"]  # nothing was taken


def test_slices_refuse_oversized_payloads():
    slices = Slices(10, 2)
    slices.new_round(4)
    with pytest.raises(Rejected, match="oversized"):
        slices.add(PLAN, 0, _slice(1, np.ones(5, np.float32)), 64)


@pytest.mark.slow
def test_killed_shard_is_restarted_and_the_run_stays_exact(nats_url, job, tmp_path):
    """SIGKILL orchestrator shard 1 mid-run: `pangea run` restarts it, the chunks it held come
    back to it (it acknowledges a round only once its mean is stored), and the run stays exact."""

    out = tmp_path / "run"
    stderr = kill_mid_run(
        out,
        job,
        nats_url,
        "shard-1",
        "--workers",
        "2",
        "--shards",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--seed",
        "6",
    )
    assert "role shard-1 killed by SIGKILL: restarting it" in stderr
    assert_verified(out)
    assert len(json.loads((out / "metrics.json").read_text())["loss"]) == 2 * 43
