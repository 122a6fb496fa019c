"""A worker's logic on the in-memory bus: the gradient it publishes for a shard is the shard's
gradient at the parameters it was sent, and it leaves when the final parameters arrive."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from pangea.bus import subjects
from pangea.roles.jobspec import spec_from_settings
from pangea.roles.worker import Worker
from pangea.settings import OrchestratorSettings, WorkerSettings
from pangea.train import kernels, steps
from pangea.train.layout import Layout
from pangea.train.models import build_model
from pangea.train.training import StepSettings, gradient
from pangea.wire import codec
from pangea.wire.chunking import Assembler, split
from pangea.wire.messages import Batch, Gradient, Params, Tensor
from tests.fakebus import FakeBus

JOB, SEED = "unit", 7


def _model():
    return build_model("mlp", (8,), 3, (5,), SEED)


def _params(version: int, flat: np.ndarray, layout: Layout, final: bool = False):
    return [
        (
            subjects.params(JOB),
            codec.encode(Params(JOB, "orchestrator", version, final, layout.hash, c, Tensor.from_numpy(v))),
            f"params:0:{version}:{c.index}:{int(final)}",
        )
        for c, v in split(flat, 64)
    ]


def test_the_worker_sends_its_shards_gradient_at_the_version_it_was_given():
    model = _model()
    layout = Layout.of(model)
    settings = OrchestratorSettings(job=JOB, model="mlp", hidden="5", seed=SEED)
    spec = spec_from_settings(
        settings,
        "orchestrator",
        input_shape=(8,),
        num_classes=3,
        num_params=layout.numel,
        layout_hash=layout.hash,
        total_rounds=1,
        vocab=0,
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 8)).astype(np.float32), rng.integers(0, 3, 6)
    start = layout.flatten_params(model) + np.float32(0.01)  # version 0: not the initial weights

    async def main() -> Worker:
        bus = FakeBus(JOB, chunk_bytes=64)  # the gradient travels in several chunks
        await bus.kv_put(subjects.job_bucket(JOB), subjects.JobKey.SPEC, codec.encode(spec))
        await bus.publish(_params(0, start, layout))
        worker = Worker(WorkerSettings(job=JOB, worker_id="w0", torch_threads=1, http_port=0), bus)
        batch = Batch(JOB, "orchestrator", 0, 0, 0, "w0", 0, 0, 6, Tensor.from_numpy(x, "x"), Tensor.from_numpy(y, "y"))
        await bus.publish([(subjects.batches(JOB, "w0"), codec.encode(batch), "batch:0:0:0:0")])
        running = asyncio.create_task(worker.run())
        while not bus.streams.get("grads"):
            await asyncio.sleep(0.01)
        await bus.publish(_params(1, start, layout, final=True))  # the job is over
        await asyncio.wait_for(running, 30)
        return worker, bus

    worker, bus = asyncio.run(main())
    received = Assembler(layout.numel)
    for msg in bus.streams["grads"]:
        grad = codec.decode(msg.payload, Gradient)
        assert (grad.round, grad.shard, grad.sender, grad.num_samples) == (0, 0, "w0", 6)
        received.add(0, grad.chunk, grad.values.numpy())
    assert received.complete and worker.shards_done == 1

    layout.load_params(model, start)  # the same computation by hand
    with kernels.threads(1):
        batch = {"x": torch.from_numpy(x).clone(), "y": torch.from_numpy(y).clone()}
        expected = gradient(model, layout, batch, steps.classify, StepSettings(seed=SEED), (0, 0, 6))
    np.testing.assert_array_equal(received.buffer, expected.values)
    grad = codec.decode(bus.streams["grads"][0].payload, Gradient)
    assert grad.count == 6 and grad.loss == expected.loss  # summed over 6 samples: their mean loss
    assert bus.kvs[subjects.members_bucket(JOB)] == {}  # it left: its heartbeat key is deleted
