"""The preprocessor: follows the round plans and publishes each worker's shard of the batch.

For every plan r: the global batch r (a seeded shuffle, independent of the worker count)
is cut into the plan's shards, and shard i goes to `pangea.<job>.batches.<worker>`,
stored in the job's batch stream (the replay log).
"""

from __future__ import annotations

import logging

from pangea import codec
from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.data import DataError, global_batch, load_dataset
from pangea.messages import Batch, RoundPlan, Tensor
from pangea.roles.jobspec import wait_for_job_spec
from pangea.settings import PreprocessorSettings

log = logging.getLogger(__name__)
SENDER = "preprocessor"


class Preprocessor:
    def __init__(self, settings: PreprocessorSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.job = settings.job
        self.rejected = 0

    async def run(self) -> None:
        spec = await wait_for_job_spec(self.bus)
        dataset = load_dataset(self.settings.dataset or spec.dataset)
        if dataset.input_shape != spec.input_shape:
            raise DataError(f"dataset {dataset.name} has samples of shape {dataset.input_shape}, job expects {spec.input_shape}")
        self.x, self.y = dataset.x_train, dataset.y_train
        self.spec = spec
        plans = await self.bus.pull("plans", subjects.plans(self.job), durable=SENDER, batch=16)
        log.info("preprocessor for job %s: %d training samples", self.job, len(self.x))
        while True:
            delivery = await plans.next(timeout=1.0)
            if delivery is None:
                continue
            try:
                plan = codec.decode(delivery.payload, RoundPlan)
            except codec.CodecError as exc:
                self.rejected += 1
                log.warning("rejected (malformed): plan: %s", exc)
                await delivery.ack()
                continue
            if plan.final:
                await delivery.ack()
                log.info("final plan received after round %d: done", plan.round - 1)
                return
            await self.publish_round(plan)
            await delivery.ack()

    async def publish_round(self, plan: RoundPlan) -> None:
        idx = global_batch(len(self.x), self.spec.batch_size, self.spec.seed, plan.epoch, plan.step)
        if len(idx) != plan.batch_size:
            log.warning("plan %d asks for %d rows, global batch has %d: skipped", plan.round, plan.batch_size, len(idx))
            return
        items = []
        for i, shard in enumerate(plan.shards):
            rows = idx[shard.start : shard.stop]
            batch = Batch(
                self.job, SENDER, plan.round, plan.epoch, plan.step, shard.worker, i, shard.start, shard.stop,
                Tensor.from_numpy(self.x[rows], "x"), Tensor.from_numpy(self.y[rows], "y"),
            )
            items.append((subjects.batches(self.job, shard.worker), codec.encode(batch), f"batch:{plan.round}:{i}"))
        await self.bus.publish(items)
