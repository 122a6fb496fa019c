"""The yardstick: the same training in one plain process, no bus, same global batches."""

from __future__ import annotations

import logging
import time

import torch

from pangea import diloco
from pangea.aggregate import RoundAccumulator, split_batch
from pangea.data import global_batch, load_dataset, position
from pangea.layout import Layout
from pangea.models import build_model
from pangea.outputs import Metrics, write_outputs
from pangea.messages import Chunk
from pangea.settings import ReferenceSettings, SettingsError
from pangea.training import epochs_ended, evaluate, loss_fn, make_optimizer, total_rounds

log = logging.getLogger(__name__)


def train_reference(settings: ReferenceSettings, progress=None) -> Metrics:
    """Train with plain torch and write params.npz, metrics.json, curves.png to settings.out."""
    if settings.mode == "diloco":
        return train_diloco_reference(settings, progress)
    if settings.mode == "async":
        raise SettingsError("--mode async has no exact reference (updates depend on timing): compare with --mode sync")
    dataset = load_dataset(settings.dataset)
    model = build_model(settings.model, dataset.input_shape, dataset.num_classes, settings.hidden_sizes, settings.seed)
    layout = Layout.of(model)
    optimizer = make_optimizer(settings, layout.params(model))
    n = len(dataset.x_train)
    rounds = total_rounds(settings, dataset)
    metrics = Metrics(job="reference", mode="reference", settings=settings.model_dump(mode="json"))
    start = time.perf_counter()
    model.train()
    for r in range(rounds):
        t0 = time.perf_counter()
        epoch, step = position(r, n, settings.batch_size)
        idx = global_batch(n, settings.batch_size, settings.seed, epoch, step)
        x, y = torch.from_numpy(dataset.x_train[idx]), torch.from_numpy(dataset.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        metrics.loss.append(loss.item())
        metrics.samples.append(len(idx))
        metrics.workers.append(1)
        metrics.round_seconds.append(time.perf_counter() - t0)
        if position(r + 1, n, settings.batch_size)[1] == 0:
            metrics.test_accuracy.append(evaluate(model, dataset.x_test, dataset.y_test))
        if progress:
            progress(r + 1, rounds, loss.item(), metrics.test_accuracy[-1] if metrics.test_accuracy else None)
    metrics.final_test_accuracy = metrics.test_accuracy[-1]
    metrics.total_seconds = time.perf_counter() - start
    write_outputs(settings.out, layout, layout.flatten_params(model), metrics)
    return metrics


def train_diloco_reference(settings: ReferenceSettings, progress=None) -> Metrics:
    """DiLoCo with `settings.workers` simulated workers, one after the other, in one process."""
    dataset = load_dataset(settings.dataset)
    model = build_model(settings.model, dataset.input_shape, dataset.num_classes, settings.hidden_sizes, settings.seed)
    worker = build_model(settings.model, dataset.input_shape, dataset.num_classes, settings.hidden_sizes, settings.seed)
    layout = Layout.of(model)
    outer = diloco.outer_optimizer(settings.outer_lr, settings.outer_momentum, layout.params(model))
    n, batch = len(dataset.x_train), settings.batch_size
    steps = total_rounds(settings, dataset)
    rounds = diloco.rounds(steps, settings.local_steps)
    shards = len(split_batch(batch, [str(k) for k in range(settings.workers)]))
    metrics = Metrics(job="reference", mode="reference", settings=settings.model_dump(mode="json"))
    start = time.perf_counter()
    model.train()
    worker.train()
    for r in range(rounds):
        t0 = time.perf_counter()
        covered = diloco.round_steps(r, settings.local_steps, steps)
        indices = [global_batch(n, batch, settings.seed, *position(g, n, batch)) for g in covered]
        begin = layout.flatten_params(model)
        results = []
        for i in range(shards):
            rows = [diloco.shard_rows(n, batch, g, shards, i) for g in covered]
            batches = [(torch.from_numpy(dataset.x_train[idx[a:b]]), torch.from_numpy(dataset.y_train[idx[a:b]]))
                       for idx, (a, b) in zip(indices, rows)]
            results.append(diloco.local_steps(worker, layout, begin, batches, settings.inner_optimizer, settings.inner_lr))
        acc = RoundAccumulator(r, layout.numel, {i: res[2] for i, res in enumerate(results)})
        for i, (delta, loss, samples) in enumerate(results):
            acc.add(i, samples, loss, Chunk(0, 1, 0, layout.numel), delta)
        layout.set_grads(model, acc.mean())
        outer.step()
        metrics.loss.append(acc.loss())
        metrics.samples.append(acc.total_samples)
        metrics.workers.append(shards)
        metrics.round_seconds.append(time.perf_counter() - t0)
        for _ in range(epochs_ended(covered, n, batch)):
            metrics.test_accuracy.append(evaluate(model, dataset.x_test, dataset.y_test))
        if progress:
            progress(r + 1, rounds, acc.loss(), metrics.test_accuracy[-1] if metrics.test_accuracy else None)
    metrics.final_test_accuracy = metrics.test_accuracy[-1]
    metrics.total_seconds = time.perf_counter() - start
    write_outputs(settings.out, layout, layout.flatten_params(model), metrics)
    return metrics
