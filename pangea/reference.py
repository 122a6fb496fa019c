"""The yardstick: the same training in one plain process, no bus, same global batches."""

from __future__ import annotations

import logging
import time

import torch

from pangea.data import global_batch, load_dataset, position
from pangea.layout import Layout
from pangea.models import build_model
from pangea.outputs import Metrics, write_outputs
from pangea.settings import ReferenceSettings
from pangea.training import evaluate, loss_fn, make_optimizer, total_rounds

log = logging.getLogger(__name__)


def train_reference(settings: ReferenceSettings, progress=None) -> Metrics:
    """Train with plain torch and write params.npz, metrics.json, curves.png to settings.out."""
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
