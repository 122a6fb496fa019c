"""What the workers, the orchestrator and the reference share: the shard gradient, the optimizer
and its schedule, the step, the round count.  Each is computed here once, so a run and its
yardstick cannot drift apart."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pangea.settings import SettingsError, TrainSettings
from pangea.train import randomness, steps, usercode
from pangea.train.data import steps_per_epoch


def check_model(layout, settings: TrainSettings) -> None:
    """Refuse, in one line, what the model's layout cannot do with these settings."""
    if layout.has_buffers and settings.compression != "none":
        raise SettingsError(
            f"--compression {settings.compression}: the model has buffers ({', '.join(layout.buffer_names[:3])}...) "
            "and lossy compression would corrupt them: use --compression none"
        )


def make_optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    """A built-in optimizer (sgd, adam, adamw) over `params` at --lr and --weight-decay."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


BUILT_IN_OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(settings: TrainSettings, model: nn.Module, layout) -> torch.optim.Optimizer:
    """The server's optimizer over the model's trainable parameters: a built-in one, or a user
    factory's (`--optimizer module:factory`, called as `factory(model)`, with `lr=` and
    `weight_decay=` when it takes them), which may put the parameters in groups of their own
    rates.  Each group's rate becomes its `base_lr`, which the schedule scales (`apply_mean`)."""
    if settings.optimizer in BUILT_IN_OPTIMIZERS:
        optimizer = make_optimizer(settings, layout.params(model))
    else:
        factory = usercode.resolve(
            settings.optimizer, what="--optimizer", error=SettingsError, code_dir=settings.code_dir
        )
        given = inspect.signature(factory).parameters
        kwargs = {k: v for k, v in (("lr", settings.lr), ("weight_decay", settings.weight_decay)) if k in given}
        try:
            optimizer = factory(model, **kwargs)
        except Exception as exc:  # noqa: BLE001 - user code: report it in one line
            raise SettingsError(
                f"--optimizer {settings.optimizer}(model) failed: {type(exc).__name__}: {exc}"
            ) from None
        _check_covers(optimizer, model, layout, settings.optimizer)
    for group in optimizer.param_groups:  # what the schedule scales (apply_mean sets it too, for others')
        group.setdefault("base_lr", group["lr"])
    return optimizer


def _check_covers(optimizer, model: nn.Module, layout, spec: str) -> None:
    """A user optimizer must step every trainable parameter: one it leaves out would silently stay
    at its initial value on the server while the workers compute gradients for it."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SettingsError(f"--optimizer {spec} returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(layout.param_names, layout.params(model)) if id(p) not in held]
    if missing:
        raise SettingsError(
            f"--optimizer {spec} leaves out {len(missing)} trainable parameters ({', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}): give every parameter of the model to a group"
        )


def lr_factor(settings: TrainSettings, step: int, total_steps: int) -> float:
    """What the schedule multiplies each group's base rate by at the server optimizer's step `step`
    (0-based) of `total_steps`: linear warmup over --warmup-steps, then 1 or a cosine decay to a
    tenth at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(settings: TrainSettings, step: int, total_steps: int) -> float:
    """The learning rate of a built-in optimizer's step `step`: the base (--lr, or --outer-lr for
    diloco's outer optimizer) times `lr_factor`."""
    base = settings.outer_lr if settings.mode == "diloco" else settings.lr
    return base * lr_factor(settings, step, total_steps)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each group's current rate, by group name (its "name" entry, else its index)."""
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


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
    the gradient part stepped by the optimizer at the schedule's rate after clipping.  Each
    group's rate is its base rate times the schedule's factor for the round number, never kept
    as state: a resumed run continues exactly.

    `mean` must be a fresh float32 vector: the gradients become views of it."""
    layout.set_grads(model, mean, copy=False)
    layout.load_buffers(model, mean)
    factor = lr_factor(settings, r, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
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


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """How a shard's step is computed, the same on every worker and in the reference."""

    seed: int = 0
    micro_batch: int = 0  # rows per piece (0: the whole shard in one pass)
    precision: str = "fp32"  # fp32, or bf16 autocast

    @classmethod
    def of(cls, settings) -> StepSettings:
        """From training settings or a job spec."""
        return cls(seed=settings.seed, micro_batch=settings.micro_batch, precision=settings.precision or "fp32")


@dataclass(frozen=True)
class ShardResult:
    """What a shard's step gives: the gradient of its loss sum (then the buffers, see `Layout`),
    the mean loss over its counted targets, and their count."""

    values: np.ndarray
    loss: float
    count: float


def gradient(
    model: nn.Module,
    layout,
    batch: Mapping[str, torch.Tensor],
    step: steps.Step,
    how: StepSettings,
    key: tuple[int, int, int],
    name: str = "the step",
    *,
    flatten: bool = True,
) -> ShardResult:
    """The gradient of the shard's loss sum as one flat float32 vector, with the buffers as the
    forward left them: what a worker computes for its shard, and the reference for each shard.

    `key`: (global batch, first row, end row) of the shard: its random draws come from them
    (`randomness`).  With `how.micro_batch`, the rows go through in pieces whose gradients add
    up in `.grad`: the result differs from one pass only by float order (and by what depends on
    the cut: batch statistics, dropout masks).  `flatten=False` leaves the gradients in `.grad`
    (diloco's inner steps) and returns no vector."""
    model.zero_grad(set_to_none=True)
    device = next(iter(batch.values())).device
    loss_sum, count = 0.0, 0.0
    with randomness.seeded(randomness.step_seed(how.seed, *key), device):
        for piece in _pieces(batch, how.micro_batch):
            with autocast(how.precision, device):
                loss, n = steps.run(step, model, piece, name)
            loss.backward()
            loss_sum += float(loss.detach())
            count += n
    values = layout.flatten_grads(model) if flatten else np.zeros(0, np.float32)  # diloco steps on .grad
    return ShardResult(values, loss_sum / count if count else 0.0, count)


def rows_of(batch: Mapping[str, torch.Tensor]) -> int:
    """Rows of a batch: the first dimension every named tensor shares."""
    return next(iter(batch.values())).shape[0]


def _pieces(batch: Mapping[str, torch.Tensor], size: int) -> Iterator[dict[str, torch.Tensor]]:
    rows = rows_of(batch)
    if size <= 0 or size >= rows:
        yield dict(batch)
        return
    for start in range(0, rows, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def autocast(precision: str, device: torch.device):
    """bf16 autocast on the device for --precision bf16; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
