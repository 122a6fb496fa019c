"""The preprocessor: follows the round plans and publishes each worker's shard of the batch.

For every plan of round r: global batch r (a seeded shuffle, independent of the worker
count) is cut into the plan's shards, and shard i goes to `pangea.<job>.batches.<worker>`,
stored in the job's batch stream (the replay log).  A re-issued plan (attempt > 0)
publishes only the shards it moved.  A round is planned ahead (`ahead`: its batches go out
while the round before is still being reduced) and then opens with the same plan, whose
batches are already out.  For a replay, the global batches come from another
job's stored batch stream instead of the dataset.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import deque
from pathlib import Path

import numpy as np

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.errors import DataError
from pangea.roles.code import fetch_code
from pangea.roles.jobspec import announce_preprocessor, settings_from_spec, wait_for_job_spec
from pangea.settings import PreprocessorSettings, TrainSettings
from pangea.train.data import steps_per_epoch
from pangea.train.plans import batch_rows, shard_rows
from pangea.train.sources import load_training_data
from pangea.wire import codec
from pangea.wire.messages import Batch, JobSpec, RoundPlan, Tensor

log = logging.getLogger(__name__)
SENDER = "preprocessor"
_STREAM_IDLE_SECONDS = 15.0


class DatasetSource:
    """Global batches from the training set, in the seeded order every role agrees on."""

    def __init__(self, spec: JobSpec, settings: PreprocessorSettings, code_dir: Path | None) -> None:
        train = settings_from_spec(spec)
        train.update(dataset=settings.dataset or spec.dataset, code_dir=code_dir)
        job = TrainSettings(**{k: v for k, v in train.items() if k in TrainSettings.model_fields})
        self.data = load_training_data(
            job, workers=settings.data_workers, validation=False, allow_pickle=settings.allow_pickled_code
        )
        if self.data.input_shape != spec.input_shape:
            raise DataError(
                f"dataset {self.data.name} has samples of shape {self.data.input_shape}, job expects {spec.input_shape}"
            )
        self.spec = spec
        self.num_samples = self.data.num_samples
        log.info(
            "serving %d training samples of %s (%d data workers)",
            self.num_samples,
            self.data.name,
            settings.data_workers,
        )

    async def global_batch(self, plan: RoundPlan) -> dict[str, np.ndarray]:
        rows = batch_rows(self.num_samples, self.spec.batch_size, plan.step)
        if rows != plan.batch_size:
            raise DataError(f"plan {plan.round} asks for {plan.batch_size} rows, global batch has {rows}")
        return await self.at(plan.epoch * steps_per_epoch(self.num_samples, self.spec.batch_size) + plan.step)

    async def at(self, global_step: int) -> dict[str, np.ndarray]:
        """Global batch number `global_step` of the run (diloco rounds cover several), by name;
        computed off the event loop (decoding images takes a while), unless making its samples sets
        the process's global generators (a user's dataset or transform): the bus client draws from
        Python's `random` when it connects, and must not draw in the middle of a sample."""
        args = (self.spec.seed, self.spec.batch_size, global_step, 0, self.spec.batch_size)
        if getattr(self.data, "touches_globals", False):
            return self.data.rows(*args)
        return await asyncio.get_running_loop().run_in_executor(None, self.data.rows, *args)

    def close(self) -> None:
        """Stop a map source's pool of data workers."""
        getattr(self.data, "close", lambda: None)()


class StreamSource:
    """Global batches rebuilt from the shards another job stored in its batch stream."""

    def __init__(self, bus: Bus, source_job: str) -> None:
        self.bus = bus
        self.source = source_job
        self.pending: dict[int, dict[int, Batch]] = {}  # round -> shard start -> shard
        self.puller = None
        self._served: dict[int, dict[str, np.ndarray]] = {}  # the last rounds served, for re-issues

    async def global_batch(self, plan: RoundPlan) -> dict[str, np.ndarray]:
        if self.puller is None:
            # From the start every time: a restarted preprocessor rebuilds the round it was on.
            await self.bus.delete_consumer("batches", f"replay-{self.bus.job}", job=self.source)
            self.puller = await self.bus.pull(
                "batches",
                subjects.batches(self.source),
                durable=f"replay-{self.bus.job}",
                job=self.source,
                batch=64,
                inactive_threshold=3600,
            )
            log.info("replaying the stored batches of job %s", self.source)
        r = plan.round
        if r in self._served:  # a re-issued plan of a round served (the one planned ahead may follow it)
            return self._served[r]
        while not self._covered(r, plan.batch_size):
            delivery = await self.puller.next(timeout=_STREAM_IDLE_SECONDS)
            if delivery is None:
                raise DataError(f"job {self.source}'s stored batches end before round {r} is complete")
            await delivery.ack()
            batch = codec.decode(delivery.payload, Batch)
            if batch.round > r and not self._covered(r, plan.batch_size):
                raise DataError(
                    f"job {self.source}'s stored batches lack part of round {r} "
                    "(expired from the stream? see PANGEA_BATCH_RETENTION_HOURS)"
                )
            if batch.round >= r:
                self.pending.setdefault(batch.round, {}).setdefault(batch.start, batch)
        shards = sorted(self.pending.pop(r).values(), key=lambda b: b.start)
        rows = {name: np.concatenate([b.tensors[name].numpy() for b in shards]) for name in shards[0].tensors}
        self._served = {k: v for k, v in self._served.items() if k >= r - 1}
        self._served[r] = rows
        return rows

    def _covered(self, r: int, rows: int) -> bool:
        end = 0
        for start in sorted(self.pending.get(r, {})):
            if start != end:
                return False
            end = self.pending[r][start].stop
        return end == rows


def _tensors(rows: dict[str, np.ndarray], start: int, stop: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Rows [start, stop) of a global batch as the Batch's x, y and other named tensors."""
    x, y = (Tensor.from_numpy(rows[name][start:stop], name) for name in ("x", "y"))
    extra = tuple(Tensor.from_numpy(a[start:stop], name) for name, a in rows.items() if name not in ("x", "y"))
    return x, y, extra


class Preprocessor:
    def __init__(self, settings: PreprocessorSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.job = settings.job
        self.rejected = 0
        self._round_starts: deque[tuple[int, int]] = deque()  # (round, first stream sequence)
        self._ahead: deque[tuple[int, int]] = deque(maxlen=8)  # (generation, round) published ahead

    async def run(self) -> None:
        spec = await wait_for_job_spec(self.bus)
        if spec.source_job:
            self.source = StreamSource(self.bus, spec.source_job)
        else:
            code = [spec.dataset, spec.transform, spec.collate, spec.val_dataset]
            code_dir = await fetch_code(self.bus, code, self.settings.code_dir, self.settings.allow_pickled_code)
            self.source = DatasetSource(spec, self.settings, code_dir)
        plans = await self.bus.pull("plans", subjects.plans(self.job), durable=SENDER, batch=16)
        await announce_preprocessor(self.bus)  # a new job's first round waits for this
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
                if isinstance(self.source, DatasetSource):
                    self.source.close()  # its data workers, whose peak RSS is then known
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
                workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                log.info(
                    "final plan received after round %d: done; peak RSS %.0f MB (data workers: %.0f MB each at most)",
                    plan.round - 1,
                    peak,
                    workers,
                )
                return
            stamp = (plan.generation, plan.round)
            if plan.ahead:
                self._ahead.append(stamp)
            elif plan.attempt == 0 and stamp in self._ahead:
                await delivery.ack()  # the round opens as planned ahead: its batches are out
                continue
            await self.publish_round(plan)
            await delivery.ack()

    async def publish_round(self, plan: RoundPlan) -> None:
        if max(1, plan.inner_steps) > 1:
            return await self.publish_local_round(plan)
        rows = await self.source.global_batch(plan)
        chosen = plan.reissue if plan.attempt else range(len(plan.shards))
        items = []
        for i in chosen:
            shard = plan.shards[i]
            x, y, extra = _tensors(rows, shard.start, shard.stop)
            batch = Batch(
                self.job,
                SENDER,
                plan.round,
                plan.epoch,
                plan.step,
                shard.worker,
                i,
                shard.start,
                shard.stop,
                x,
                y,
                plan.generation,
                extra=extra,
            )
            msg_id = f"batch:{plan.generation}:{plan.round}:{i}:{plan.attempt}"
            items.append((subjects.batches(self.job, shard.worker), codec.encode(batch), msg_id))
        if plan.attempt:
            log.info("round %d attempt %d: shards %s re-issued", plan.round, plan.attempt, list(plan.reissue))
        sequences = await self.bus.publish(items)
        await self._retain(plan, min(sequences))

    async def publish_local_round(self, plan: RoundPlan) -> None:
        """diloco: shard i of each of the round's global batches, in order, as one Batch each."""
        if not isinstance(self.source, DatasetSource):
            raise DataError("replaying a diloco job from its stored batches is not supported yet")
        n, size = self.source.num_samples, self.source.spec.batch_size
        first = plan.epoch * steps_per_epoch(n, size) + plan.step
        chosen = plan.reissue if plan.attempt else range(len(plan.shards))
        items = []
        for h in range(plan.inner_steps):
            rows = await self.source.at(first + h)
            for i in chosen:
                worker = plan.shards[i].worker
                a, b = shard_rows(n, size, first + h, len(plan.shards), i)
                x, y, extra = _tensors(rows, a, b)
                batch = Batch(
                    self.job,
                    SENDER,
                    plan.round,
                    plan.epoch,
                    plan.step,
                    worker,
                    i,
                    a,
                    b,
                    x,
                    y,
                    plan.generation,
                    h,
                    plan.inner_steps,
                    extra=extra,
                )
                msg_id = f"batch:{plan.generation}:{plan.round}:{i}:{plan.attempt}:{h}"
                items.append((subjects.batches(self.job, worker), codec.encode(batch), msg_id))
        if plan.attempt:
            log.info("round %d attempt %d: shards %s re-issued", plan.round, plan.attempt, list(plan.reissue))
        sequences = await self.bus.publish(items)
        await self._retain(plan, min(sequences))

    async def _retain(self, plan: RoundPlan, first_sequence: int) -> None:
        """With PANGEA_BATCH_RETENTION_ROUNDS = N, drop the batches of rounds before the last N."""
        keep = self.settings.batch_retention_rounds
        if not keep or plan.attempt:
            return
        self._round_starts.append((plan.round, first_sequence))
        while len(self._round_starts) > keep:
            self._round_starts.popleft()
        if len(self._round_starts) == keep:
            await self.bus.purge_before("batches", self._round_starts[0][1])
