"""Checkpoints on a real nats-server's Object Store: streamed from a temporary file (no in-memory
copy of the state), or serialised in memory when no temporary file can be written; either way
what comes back is what was stored."""

from __future__ import annotations

import asyncio
import io
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from pangea.bus.client import Bus
from pangea.roles.checkpoints import CheckpointStore
from pangea.settings import BusSettings
from pangea.train.checkpoint import Checkpoint
from pangea.train.outputs import Metrics


@pytest.mark.parametrize("tmpdir_usable", [True, False])
def test_a_stored_checkpoint_comes_back_whole(nats_url, job, tmp_path, monkeypatch, caplog, tmpdir_usable):
    if not tmpdir_usable:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))  # TemporaryFile fails
    rng = np.random.default_rng(3)
    params = rng.standard_normal(300_000).astype(np.float32)  # several Object Store chunks
    state = {"state": {0: {"momentum_buffer": torch.from_numpy(rng.standard_normal(5).astype(np.float32))}}}
    ckpt = Checkpoint(7, params, {**state, "param_groups": [{"lr": 0.1, "params": [0]}]}, {"loss": [1.0]}, "h")

    async def main() -> Checkpoint | None:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "test")
        try:
            store = CheckpointStore(bus, job, keep=2)
            await store.save(ckpt)
            latest = await store.latest()
            assert (await store.at_or_before(job, 7)).round == 7
            return latest
        finally:
            await bus.delete_job()
            await bus.close()

    back = asyncio.run(main())
    assert back is not None and back.round == 7 and back.layout_hash == "h" and back.metrics == {"loss": [1.0]}
    assert np.array_equal(back.params, params)
    buf = back.optimizer["state"][0]["momentum_buffer"]
    assert torch.equal(buf, state["state"][0]["momentum_buffer"])
    assert ("serialised in memory" in caplog.text) is not tmpdir_usable


def test_a_checkpoint_keeps_the_metrics_as_they_were_when_it_was_written():
    """The checkpoint holds the live metrics (no deep copy, which grew with every round): they come
    back whole through the weights-only loader, and what the run adds afterwards is not in them."""
    metrics = Metrics(job="j", mode="run", settings={"lr": 0.1, "hidden": [128]})
    for r in range(30):
        metrics.loss.append(1.0 / (r + 1))
        metrics.round_seconds.append(0.01)
        metrics.plans.append({"round": r, "first_step": r, "shards": [{"rows": [[0, 32]], "workers": ["w0"]}]})
    metrics.add_evaluation(29, {"test_accuracy": 0.9}, 1)
    metrics.rejected["stale"] = 2
    ckpt = Checkpoint(30, np.zeros(4, np.float32), {"state": {}, "param_groups": []}, metrics.fields_shared(), "h")
    stored = ckpt.to_bytes()
    metrics.loss.append(0.01)  # the run goes on
    metrics.rejected["stale"] = 3
    back = Metrics(**Checkpoint.from_bytes(stored).metrics)
    assert len(back.loss) == 30 and back.rejected == {"stale": 2}
    metrics.loss.pop()
    metrics.rejected["stale"] = 2
    assert back == metrics


def test_checkpoints_stored_in_the_background_land_in_order_as_they_were(nats_url, job):
    """`save_later` serialises at once and stores while the caller goes on: the second checkpoint
    waits for the first, `latest` ends as the second, and each holds the metrics of its moment."""
    metrics = Metrics(job="j", mode="run", settings={})
    params = np.arange(10, dtype=np.float32)

    def snapshot(round_: int) -> Checkpoint:
        return Checkpoint(round_, params + round_, {"state": {}, "param_groups": []}, metrics.fields_shared(), "h")

    async def main() -> tuple[Checkpoint | None, Checkpoint]:
        bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "test")
        try:
            store = CheckpointStore(bus, job, keep=2)
            metrics.loss.append(0.5)
            store.save_later(snapshot(5))
            metrics.loss.append(0.25)  # the next round, while round 5's checkpoint is stored
            store.save_later(snapshot(6))
            await store.saved()
            return await store.latest(), await store.at_or_before(job, 5)
        finally:
            await bus.delete_job()
            await bus.close()

    latest, fifth = asyncio.run(main())
    assert latest is not None and latest.round == 6 and latest.metrics["loss"] == [0.5, 0.25]
    assert fifth.round == 5 and fifth.metrics["loss"] == [0.5]
    assert np.array_equal(fifth.params, params + 5) and np.array_equal(latest.params, params + 6)


def test_a_checkpoint_of_the_previous_format_is_still_read():
    """Format 1 (metrics as a pickled dict), as an orchestrator before format 2 stored it."""
    buffer = io.BytesIO()
    state = {"state": {}, "param_groups": []}
    torch.save(
        {
            "format": 1,
            "round": 3,
            "params": torch.zeros(2),
            "optimizer": state,
            "metrics": {"loss": [1.0]},
            "layout_hash": "h",
        },
        buffer,
    )
    back = Checkpoint.from_bytes(buffer.getvalue())
    assert back.round == 3 and back.metrics == {"loss": [1.0]} and back.optimizer == state
    newer = io.BytesIO()
    torch.save({"format": 9}, newer)
    with pytest.raises(ValueError, match="checkpoint format 9"):
        Checkpoint.from_bytes(newer.getvalue())


def test_a_checkpoint_that_could_not_be_stored_is_reported_by_the_next_one():
    """A background store that failed raises at the next checkpoint, not only at the end of the run."""

    class Unreachable:
        async def put_object(self, bucket, name, file):
            raise RuntimeError("storing failed")

    async def main() -> None:
        store = CheckpointStore(Unreachable(), "j", keep=2)
        ckpt = Checkpoint(1, np.zeros(2, np.float32), {"state": {}, "param_groups": []}, {}, "h")
        store.save_later(ckpt)
        for _ in range(10):  # the store runs (and fails) while the caller goes on
            await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="storing failed"):
            store.save_later(replace(ckpt, round=2))

    asyncio.run(main())
