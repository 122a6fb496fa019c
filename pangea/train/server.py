"""The server side of training: the task, its data, the model with its optimizer, and the rounds
of the run.  The orchestrator and the reference build it the same way, here, so the yardstick
cannot drift from what a run computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pangea.settings import TrainSettings
from pangea.train import diloco, randomness
from pangea.train.layout import Layout
from pangea.train.models import build_model
from pangea.train.sources import load_training_data
from pangea.train.tasks import Task, get_task, probe
from pangea.train.training import apply_mean, build_optimizer, check_model, total_rounds


def build(settings: TrainSettings, data) -> nn.Module:
    """The model of `settings` for `data`, with the seed's initial weights (the same everywhere)."""
    return build_model(
        settings.model,
        data.input_shape,
        data.num_classes,
        settings.hidden_sizes,
        settings.seed,
        layers=settings.layers,
        heads=settings.heads,
        dim=settings.dim,
        code_dir=settings.code_dir,
    )


def task_of(settings: TrainSettings) -> Task:
    """The task of `settings`, with the user's step if one is given."""
    return get_task(settings.task, settings.step, code_dir=settings.code_dir)


@dataclass(kw_only=True)
class Server:
    """What the orchestrator holds: the model and its optimizer, over the task's data."""

    settings: TrainSettings
    task: Task
    data: object  # data.Dataset or tokens.TokenData
    model: nn.Module
    layout: Layout
    optimizer: torch.optim.Optimizer
    total_steps: int  # global batches in the run
    total_rounds: int  # optimizer steps: one per global batch (sync, async), one per H (diloco)

    @classmethod
    def build(cls, settings: TrainSettings, data=None) -> Server:
        """One line (UserError) for a task, data set or model that cannot go together."""
        task = task_of(settings)
        data = data or load_training_data(settings)
        model = build(settings, data)
        probe(task, model, data, settings.model, settings.normalize)
        model.train()
        layout = Layout.of(model)
        check_model(layout, settings)
        if settings.mode == "diloco":  # the outer optimizer, applied to the mean pseudo-gradient
            optimizer = diloco.outer_optimizer(settings.outer_lr, settings.outer_momentum, layout.params(model))
        else:
            optimizer = build_optimizer(settings, model, layout)
        steps = total_rounds(settings, data)
        rounds = diloco.rounds(steps, settings.local_steps) if settings.mode == "diloco" else steps
        return cls(
            settings=settings, task=task, data=data, model=model, layout=layout, optimizer=optimizer,
            total_steps=steps, total_rounds=rounds,
        )  # fmt: skip

    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    def round_steps(self, r: int) -> range:
        """The global batches round r covers: r itself (sync), or H of them from r*H (diloco)."""
        if self.settings.mode == "diloco":
            return diloco.round_steps(r, self.settings.local_steps, self.total_steps)
        return range(r, r + 1)

    def step(self, mean: np.ndarray, r: int) -> None:
        """Round r's mean (a fresh float32 vector): buffers taken, the optimizer's step."""
        apply_mean(self.settings, self.layout, self.model, self.optimizer, mean, r, self.total_rounds)

    def evaluate(self) -> dict[str, float]:
        """The task's figures, on generators seeded the same for every evaluation of the run."""
        with randomness.seeded(randomness.evaluation_seed(self.settings.seed), "cpu"):
            return self.task.evaluate(self.model, self.data, self.settings.normalize)

    def load_optimizer(self, state: dict) -> None:
        """The optimizer's state from a checkpoint; a group saved before groups kept their base
        rate (`base_lr`) gets the one this run set."""
        bases = [g.get("base_lr", g["lr"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, base in zip(self.optimizer.param_groups, bases):
            group.setdefault("base_lr", base)
