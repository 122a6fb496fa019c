"""Checkpoints on a real nats-server's Object Store: streamed from a temporary file (no in-memory
copy of the state), or serialised in memory when no temporary file can be written; either way
what comes back is what was stored."""

from __future__ import annotations

import asyncio
import tempfile

import numpy as np
import pytest
import torch

from pangea.bus.client import Bus
from pangea.roles.checkpoints import CheckpointStore
from pangea.settings import BusSettings
from pangea.train.checkpoint import Checkpoint


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
