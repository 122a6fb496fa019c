"""A training step: what one shard's rows contribute to a round, as `(loss_sum, count)`.

`step(model, batch) -> (loss_sum, count)`: `batch` maps names to tensors on the worker's device
(`x` and `y`, and any other named tensors the data has: an attention mask, a loss mask);
`loss_sum` is the loss summed over the shard's counted targets (samples, or tokens that are not
masked) and `count` is their number.  A worker sends the gradient of `loss_sum` and `count`; the
orchestrator divides the sum of the gradients by the sum of the counts, which is the gradient of
the global batch's mean over counted targets for any number of workers.  A per-shard mean
weighted by rows is not, as soon as shards hold different numbers of targets (padding, masked
tokens): that is why the step returns a sum.

The built-in tasks are such steps (`classify`, `lm`, and a user loss `module:function` of
`(output, target)` that returns the mean over its batch).  A user's own step is `--step
module:function`.

Models are called by name where they say how (`forward`): a Hugging Face model takes `x` as its
`main_input_name` (`input_ids`, `pixel_values`) and returns an output object whose `.logits` the
built-in steps use; any model whose `forward` names a parameter after one of the batch's other
tensors (`attention_mask`) gets it.  `labels` is never passed: the built-in steps compute the
loss from the logits and `y`, whose language-model targets are already shifted by the data, so
the shift is done once.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from pangea.errors import TaskError

Batch = Mapping[str, torch.Tensor]
Step = Callable[[nn.Module, Batch], tuple[torch.Tensor, object]]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # a mean loss of (output, target)

IGNORE_INDEX = -100  # a target that does not count (torch's and Hugging Face's convention)
_NOT_PASSED = frozenset({"x", "y", "labels"})  # x goes first (or by the model's input name)


# ---------------------------------------------------------------- calling a model


def forward(model: nn.Module, batch: Batch):
    """The model's output for a batch: `x` positionally, or under the model's `main_input_name`
    (Hugging Face), and each other named tensor its `forward` declares by name."""
    accepted = _named_parameters(type(model))
    extra = {k: v for k, v in batch.items() if k not in _NOT_PASSED and k in accepted}
    name = getattr(model, "main_input_name", None)
    if isinstance(name, str) and name:
        return model(**{name: batch["x"]}, **extra)
    return model(batch["x"], **extra)


@functools.cache
def _named_parameters(cls: type) -> frozenset[str]:
    """Names `cls.forward` takes explicitly (not through **kwargs)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds) - {"self"}


def logits(output) -> torch.Tensor:
    """The tensor a model's output holds: itself, `.logits` (Hugging Face's output objects), a
    mapping's "logits", or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    if not isinstance(found, torch.Tensor):
        raise TaskError(
            f"the model returned {type(output).__name__}: return a tensor, an object with .logits, or a tuple "
            "whose first item is the output (or write your own --step)"
        )
    return found


# ---------------------------------------------------------------- the built-in steps


def classify(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy of (rows, classes) logits against integer labels, summed over the rows."""
    target = batch["y"]
    return nn.functional.cross_entropy(logits(forward(model, batch)), target, reduction="sum"), target.shape[0]


def lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of (rows, tokens, vocabulary) logits, summed over every target that
    is not IGNORE_INDEX; the count is those targets."""
    out, target = logits(forward(model, batch)), batch["y"]
    loss = nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return loss, (target != IGNORE_INDEX).sum()


def of_loss(loss: Loss) -> Step:
    """The step of a user loss `loss(output, target)` that returns the mean over its batch: that mean
    times the rows, over the rows (what `--task module:function` has always meant)."""

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        rows = batch["y"].shape[0]
        return loss(logits(forward(model, batch)), batch["y"]) * rows, rows

    step.__name__ = step.__qualname__ = getattr(loss, "__name__", "loss")
    return step


# ---------------------------------------------------------------- calling a step


def run(step: Step, model: nn.Module, batch: Batch, name: str) -> tuple[torch.Tensor, float]:
    """`step(model, batch)`, its result checked: a scalar tensor and a finite count >= 0."""
    result = step(model, batch)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TaskError(f"{name} must return (loss_sum, count), got {type(result).__name__}")
    loss_sum, count = result
    if not isinstance(loss_sum, torch.Tensor) or loss_sum.numel() != 1:
        raise TaskError(f"{name}: loss_sum must be a tensor holding one number, got {_describe(loss_sum)}")
    try:
        count = float(count)
    except (TypeError, ValueError, RuntimeError):
        raise TaskError(f"{name}: count must be a number (the targets summed over), got {_describe(count)}") from None
    if not math.isfinite(count) or count < 0:
        raise TaskError(f"{name}: count must be a finite number >= 0, got {count}")
    return loss_sum.reshape(()), count


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r:.40}"
