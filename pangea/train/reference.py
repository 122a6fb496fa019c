"""The yardstick: what a distributed run computes, in one plain process with no bus.

Each round's shards are computed one after the other with the kernels the workers use
(same torch build, device and intra-op thread count), their results summed in float64 over
their counts exactly as the orchestrator sums them (`RoundAccumulator`), and the same
optimizer steps on the mean.  So a run's parameters equal these to the last bit or close to
it, where a plain whole-batch loop (`--workers 1`) drifts: summing shard gradients rounds
differently from one big matmul, and training amplifies the last bit.

The rounds come from `fixed_plans` (K workers that never change: `pangea reference --workers K`)
or from a run's recorded `plans.jsonl` (`pangea verify`, membership changes and re-issues
included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from pangea.settings import ReferenceSettings, SettingsError
from pangea.train import diloco, inputs, kernels, plans
from pangea.train.aggregate import RoundAccumulator, sums_on_wire
from pangea.train.events import EventLog
from pangea.train.outputs import Metrics, write_outputs
from pangea.train.server import Server, build
from pangea.train.training import StepSettings, epochs_ended, evaluations_due, gradient, learning_rates
from pangea.wire.messages import Chunk

log = logging.getLogger(__name__)
WORKER = "reference"  # the name fixed plans give every shard's worker
Progress = Callable[[int, int, float, float | None], None]


@dataclass(frozen=True, kw_only=True)
class Aggregation:
    """How the orchestrator combined the shard results (verify reproduces robust runs too)."""

    aggregator: str = "mean"
    byzantine: int = 1
    clip_norm: float = 0.0

    @property
    def robust(self) -> bool:
        return self.aggregator != "mean" or self.clip_norm > 0


def fixed_plans(server: Server, workers: int, threads: int) -> Iterator[plans.RoundRecord]:
    """The rounds of a run whose `workers` workers never change, as its orchestrator cuts them."""
    n, size, names = server.num_samples, server.settings.batch_size, [WORKER] * workers
    for r in range(server.total_rounds):
        covered = server.round_steps(r)
        cut = plans.cut(n, size, covered, names)
        shards = tuple(plans.ShardRecord(rows=rows, workers=(WORKER,), threads=threads) for _, rows in cut)
        yield plans.RoundRecord(round=r, first_step=covered[0], shards=shards)


def train_reference(
    settings: ReferenceSettings,
    progress: Progress | None = None,
    *,
    records: Iterable[plans.RoundRecord] | None = None,
    aggregation: Aggregation = Aggregation(),
    optimizer_threads: int = 0,
    dataset=None,
) -> Metrics:
    """Train in this process and write params.npz, metrics.json, plans.jsonl, curves.png to settings.out.

    `records`: the rounds to compute (default: `fixed_plans`).  Shard gradients run on each
    record's thread count (default `settings.torch_threads`, else what `pangea run` gives a
    worker); the optimizer steps on `optimizer_threads` (default: this process's count).
    `dataset`: `settings.dataset`, if the caller has it loaded already.
    """
    if settings.mode == "async":
        raise SettingsError("--mode async has no exact reference (updates depend on timing): compare with --mode sync")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda requested but torch sees no CUDA device")
    server = Server.build(settings, dataset)  # what the orchestrator holds: the model, its optimizer
    default_threads = settings.torch_threads or kernels.worker_threads(settings.workers)
    optimizer_threads = optimizer_threads or torch.get_num_threads()
    if records is None:
        records = fixed_plans(server, settings.workers, default_threads)
    before = torch.get_num_threads()
    try:
        return _train(server, records, aggregation, default_threads, optimizer_threads, progress)
    finally:
        kernels.set_threads(before)


def _train(
    server: Server,
    records: Iterable[plans.RoundRecord],
    aggregation: Aggregation,
    default_threads: int,
    optimizer_threads: int,
    progress: Progress | None,
) -> Metrics:
    settings, dataset, task, layout = server.settings, server.data, server.task, server.layout
    worker = build(settings, dataset).to(settings.device)  # what a worker computes with
    worker.train()
    metrics = Metrics(
        job="reference",
        mode="reference",
        settings=settings.model_dump(mode="json"),
        targets_per_sample=dataset.targets_per_sample,
    )
    used_threads: set[int] = set()
    start = time.perf_counter()
    expected = 0
    events = EventLog(settings.out, targets_per_sample=dataset.targets_per_sample if task.is_lm else 1)
    with events:
        for record in records:
            if record.round != expected:
                raise SettingsError(f"the plans jump from round {expected - 1} to {record.round}")
            expected += 1
            t0 = time.perf_counter()
            acc = _round(server, worker, record, aggregation, default_threads, used_threads)
            kernels.set_threads(optimizer_threads)
            if aggregation.robust:
                mean = acc.robust(aggregation.aggregator, aggregation.byzantine, aggregation.clip_norm)
            else:
                mean = acc.mean()
            server.step(mean, record.round)
            _record(server, record, acc, time.perf_counter() - t0, metrics, events)
            if progress:
                progress(record.round + 1, server.total_rounds, acc.loss(), metrics.final.get(task.headline))
    metrics.total_seconds = time.perf_counter() - start
    optimizer_kernels = kernels.current().as_dict()
    worker_kernels = [
        kernels.Kernels(**{**optimizer_kernels, "device": settings.device, "threads": t}).as_dict()
        for t in sorted(used_threads)
    ]
    metrics.kernels = {
        "optimizer": optimizer_kernels,
        "workers": {f"{WORKER}-{k['threads']}": k for k in worker_kernels},
    }
    write_outputs(settings.out, layout, layout.flatten_params(server.model), metrics)
    return metrics


def _round(
    server: Server,
    worker: torch.nn.Module,
    record: plans.RoundRecord,
    aggregation: Aggregation,
    default_threads: int,
    used_threads: set[int],
) -> RoundAccumulator:
    """Each shard of a round computed here in turn, on its worker's thread count, and summed as the
    orchestrator sums them."""
    settings, dataset, task, layout = server.settings, server.data, server.task, server.layout
    how = StepSettings.of(settings)
    begin = layout.flatten_params(server.model)
    acc = RoundAccumulator(
        record.round,
        layout.numel,
        {i: s.samples for i, s in enumerate(record.shards)},
        keep_rows=aggregation.robust,
        params_end=layout.param_numel,
        summed=sums_on_wire(settings.mode, settings.compression),
    )
    for i, shard in enumerate(record.shards):
        threads = shard.threads or default_threads
        kernels.set_threads(threads)
        used_threads.add(threads)
        batches = [((g, a, b), _rows(dataset, settings, g, a, b)) for g, (a, b) in zip(record.steps, shard.rows)]
        if settings.mode == "diloco":
            values, loss, _, count = diloco.local_steps(
                worker, layout, begin, batches, settings.inner_optimizer, settings.inner_lr, task.step, how, task.label
            )
        else:
            layout.load_params(worker, begin)
            ((key, rows),) = batches
            result = gradient(worker, layout, rows, task.step, how, key, task.label)
            values, loss, count = result.values, result.loss, result.count
        acc.add(i, shard.samples, loss, Chunk(0, 1, 0, layout.numel), values, count)
    return acc


def _record(
    server: Server, record: plans.RoundRecord, acc: RoundAccumulator, seconds: float, metrics: Metrics, events: EventLog
) -> None:
    """A round's figures into the metrics and the event files; the evaluation when one is due."""
    n, size, covered = server.num_samples, server.settings.batch_size, record.steps
    metrics.plans.append(record.to_dict())
    metrics.loss.append(acc.loss())
    metrics.samples.append(acc.total_samples)
    metrics.workers.append(len(record.shards))
    metrics.round_seconds.append(seconds)
    events.add_round(
        record.round,
        loss=acc.loss(),
        lrs=learning_rates(server.optimizer),
        samples=acc.total_samples,
        seconds=seconds,
        workers=len(record.shards),
    )
    if evaluations_due(covered, n, size, server.settings.eval_every) or record.round + 1 == server.total_rounds:
        metrics.add_evaluation(record.round, server.evaluate(), epochs_ended(covered, n, size))
        events.add_evaluation(record.round, metrics.final)


def _rows(dataset, settings: ReferenceSettings, global_step: int, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a global batch as a worker receives them, on the device."""
    rows = dataset.rows(settings.seed, settings.batch_size, global_step, start, stop)
    return inputs.tensors(rows, settings.device, settings.normalize)
