"""What the orchestrator and the reference share: loss, optimizer, evaluation, round count."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pangea.data import Dataset, steps_per_epoch
from pangea.settings import TrainSettings


class Diverged(ValueError):
    """Training produced non-finite parameters; the message says at which round."""


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: a shard's gradient is the mean over its own samples."""
    return nn.functional.cross_entropy(logits, target)


def make_optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def total_rounds(settings: TrainSettings, dataset: Dataset) -> int:
    return settings.epochs * steps_per_epoch(len(dataset.x_train), settings.batch_size)


def epochs_ended(global_steps: range, num_samples: int, batch_size: int) -> int:
    """How many epochs end within these global steps (a diloco round may span several)."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    return sum(1 for g in global_steps if g % per_epoch == per_epoch - 1)


def batch_rows(num_samples: int, batch_size: int, step: int) -> int:
    """Rows of global batch `step` (the last batch of an epoch may be short)."""
    return min(batch_size, num_samples - step * batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 4096) -> float:
    """Test accuracy of the model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i : i + batch]).to(device))
        correct += int((logits.argmax(1).cpu() == torch.from_numpy(y[i : i + batch])).sum())
    model.train(was_training)
    return correct / len(x)
