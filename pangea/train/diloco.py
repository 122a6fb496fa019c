"""DiLoCo (arXiv 2311.08105): H local steps per worker, then one outer step on the average
of the workers' parameter deltas (the pseudo-gradient).  Pure torch/numpy, no bus: the
worker, the orchestrator and the reference all call these.

Round r of a diloco job covers the global batches r*H .. r*H+H-1 (the same sequence of
global batches as a sync job, independent of the worker count).  Shard i of the round is
the i-th slice of each of those global batches, so a worker's H inner steps see the same
samples a sync run would give it, and `pangea reference --mode diloco` can simulate the K
workers exactly.

One deliberate difference from the paper: the inner optimizer starts fresh every round
(the paper keeps each worker's inner Adam state across rounds).  It keeps workers
stateless, so a shard re-issued to another worker, or a worker joining mid-run, gives
bit-for-bit the same pseudo-gradient, which is what makes membership changes exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from pangea.train import steps
from pangea.train.layout import Layout
from pangea.train.training import StepSettings, gradient, rows_of


def rounds(total_steps: int, local_steps: int) -> int:
    """Outer rounds needed to cover `total_steps` global batches, H per round (the last may be short)."""
    return math.ceil(total_steps / local_steps)


def round_steps(round_: int, local_steps: int, total_steps: int) -> range:
    """Global step numbers (0-based over the whole run) that round `round_` covers."""
    return range(round_ * local_steps, min((round_ + 1) * local_steps, total_steps))


def inner_optimizer(kind: str, lr: float, params) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def outer_optimizer(lr: float, momentum: float, params) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, applied to the averaged pseudo-gradient."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


def local_steps(
    model: nn.Module,
    layout: Layout,
    start: np.ndarray,
    batches: Iterable[tuple[tuple[int, int, int], Mapping[str, torch.Tensor]]],
    kind: str,
    lr: float,
    step: steps.Step,
    how: StepSettings,
    name: str = "the step",
) -> tuple[np.ndarray, float, int, float]:
    """Run the inner steps from state `start`: (pseudo-gradient start - end, mean loss over the
    counted targets, samples, counted targets).

    `batches`: each local step's key (global batch, first row, end row: its random draws come
    from it, see `pangea.train.randomness`) and its rows.  Each inner step follows the gradient
    of its mean loss over counted targets (micro-batched and autocast as `how` says).  The buffer
    part of the result is the buffers at the end (running statistics are averaged, not stepped).
    An empty batch (a short last global batch cut into more shards than it has rows) is skipped:
    no step, no samples.
    """
    layout.load_params(model, start)
    optimizer = inner_optimizer(kind, lr, layout.params(model))
    loss_sum, samples, counted = 0.0, 0, 0.0
    for key, batch in batches:
        rows = rows_of(batch)
        if rows == 0:
            continue
        result = gradient(model, layout, batch, step, how, key, name, flatten=False)
        if result.count > 0:  # the mean over counted targets; none counted: no gradient to follow
            for p in layout.params(model):
                if p.grad is not None:
                    p.grad.div_(result.count)
            optimizer.step()
        loss_sum += result.loss * result.count
        samples += rows
        counted += result.count
    end = layout.flatten_params(model)
    delta = (start - end).astype(np.float32)
    delta[layout.param_numel :] = end[layout.param_numel :]
    return delta, loss_sum / counted if counted else 0.0, samples, counted
