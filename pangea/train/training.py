"""What the workers, the orchestrator and the reference share: the shard gradient, the optimizer
and its schedule, the step, the round count.  Each is computed here once, so a run and its
yardstick cannot drift apart."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pangea.settings import SettingsError, TrainSettings
from pangea.train.data import steps_per_epoch
from pangea.train.tasks import Loss, classify_loss


def check_model(layout, settings: TrainSettings) -> None:
    """Refuse, in one line, what the model's layout cannot do with these settings."""
    if layout.has_buffers and settings.compression != "none":
        raise SettingsError(
            f"--compression {settings.compression}: the model has buffers ({', '.join(layout.buffer_names[:3])}...) "
            "and lossy compression would corrupt them: use --compression none"
        )


def make_optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def lr_at(settings: TrainSettings, step: int, total_steps: int) -> float:
    """The learning rate of the server optimizer's step `step` (0-based) of `total_steps`: linear
    warmup over --warmup-steps, then constant or a cosine decay to a tenth at the last step.
    The base is --lr, or --outer-lr for diloco's outer optimizer."""
    base = settings.outer_lr if settings.mode == "diloco" else settings.lr
    if step < settings.warmup_steps:
        return base * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return base
    span = max(1, total_steps - 1 - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = base / 10
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_mean(
    settings: TrainSettings,
    layout,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    mean: np.ndarray,
    r: int,
    total_steps: int,
) -> None:
    """What the server does with round r's mean: buffers (running statistics) taken as they are,
    the gradient part stepped by the optimizer at the schedule's rate after clipping.  The lr is
    set from the round number, never kept as state: a resumed run continues exactly.

    `mean` must be a fresh float32 vector: the gradients become views of it."""
    layout.set_grads(model, mean, copy=False)
    layout.load_buffers(model, mean)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(settings, r, total_steps)
    if settings.clip_grad > 0:
        nn.utils.clip_grad_norm_(layout.params(model), settings.clip_grad)
    optimizer.step()
    # The gradients are views of `mean`: dropped, so that its memory goes back as soon as the
    # caller drops it, before the parameters are flattened for the broadcast.
    model.zero_grad(set_to_none=True)


def total_rounds(settings: TrainSettings, data) -> int:
    """Global batches in the run: `settings.epochs` passes over `data.num_samples` samples, or
    `settings.max_steps` if that is fewer."""
    steps = settings.epochs * steps_per_epoch(data.num_samples, settings.batch_size)
    return min(steps, settings.max_steps) if settings.max_steps else steps


def epochs_ended(global_steps: range, num_samples: int, batch_size: int) -> int:
    """How many epochs end within these global steps (a diloco round may span several)."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    return sum(1 for g in global_steps if g % per_epoch == per_epoch - 1)


def evaluations_due(global_steps: range, num_samples: int, batch_size: int, every: int) -> bool:
    """Whether the round covering these global steps ends with an evaluation: at an epoch's end,
    and every `every` global steps when set."""
    if epochs_ended(global_steps, num_samples, batch_size):
        return True
    return every > 0 and any((g + 1) % every == 0 for g in global_steps)


def gradient(
    model: nn.Module,
    layout,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Loss = classify_loss,
) -> tuple[np.ndarray, float]:
    """The gradient of the mean loss over (x, y) as one flat float32 vector (with the buffers as
    the forward left them, see `Layout`), and that loss.

    What a worker computes for its shard, and what the reference computes for each shard.
    """
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    return layout.flatten_grads(model), loss.item()
