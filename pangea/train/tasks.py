"""What is learned: how a shard's loss is computed, where its samples come from, how a model is judged.

- `classify` (default): cross-entropy of (batch, classes) logits against integer labels of an
  in-memory data set (digits, .npz); judged by test accuracy.
- `lm`: next-token cross-entropy over windows of a token file (`pangea.train.tokens`), the mean over
  every target token of the shard; judged by validation loss, bits per token (per byte for a
  .txt, whose tokens are bytes) and perplexity.
- `module:function`: a user's `function(output, target) -> loss`, the mean over the samples of
  the batch it is given, on an .npz whose targets may be anything numeric; judged by test loss.

The orchestrator weights each shard's mean loss gradient by the shard's samples.  For `lm`
every window holds `context` targets, so the sample-weighted mean is the token-weighted mean:
exact, as for classification.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pangea.errors import TaskError
from pangea.train.data import Dataset
from pangea.train.tokens import TokenData

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classify_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch's samples."""
    return nn.functional.cross_entropy(output, target)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every target of every window: logits (B, T, V), target (B, T)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass(frozen=True)
class Task:
    name: str
    loss: Loss
    headline: str  # the evaluation figure a progress bar shows

    @property
    def is_lm(self) -> bool:
        return self.name == "lm"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset | TokenData) -> dict[str, float]:
        """The model's figures on held-out data (test set, or validation windows), in eval mode."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum, samples, correct = 0.0, 0, 0
        for x, y in data.eval_batches():
            output = model(torch.from_numpy(x).to(device))
            target = torch.from_numpy(y).to(device)
            loss_sum += float(self.loss(output, target)) * len(x)
            samples += len(x)
            if self.name == "classify":
                correct += int((output.argmax(1) == target).sum())
        model.train(was_training)
        loss = loss_sum / max(1, samples)
        if self.name == "classify":
            return {"test_accuracy": correct / max(1, samples), "test_loss": loss}
        if self.is_lm:
            figures = {"val_loss": loss, "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 700))}
            if data.bytes_per_token:
                figures["bits_per_byte"] = figures["bits_per_token"] / data.bytes_per_token
            return figures
        return {"test_loss": loss}


def get_task(spec: str) -> Task:
    """`classify`, `lm`, or `module:function` (a loss with the documented signature)."""
    if spec == "classify":
        return Task("classify", classify_loss, "test_accuracy")
    if spec == "lm":
        return Task("lm", lm_loss, "val_loss")
    return Task(spec, _user_loss(spec), "test_loss")


def _user_loss(spec: str) -> Loss:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"unknown --task {spec!r}: use classify, lm or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import {module_name!r} for --task {spec}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise TaskError(f"--task {spec}: {module_name} has no callable {attr!r}")
    try:
        inspect.signature(function).bind(torch.zeros(1), torch.zeros(1))
    except (TypeError, ValueError):
        raise TaskError(
            f"--task {spec}: {attr}{inspect.signature(function)} must take (output, target) and return "
            "the mean loss over the batch"
        ) from None
    return function


def probe(task: Task, model: nn.Module, data: Dataset | TokenData, model_name: str) -> None:
    """One sample through the model and the loss, before any process relies on them: a mismatch
    (a context longer than the model's, a loss that returns no scalar) is one line, not a crash."""
    x, y = data.batch(0, 1, 0, 0, 1)
    was_training = model.training
    model.eval()  # touches no running statistics, and takes a batch of one
    try:
        with torch.no_grad():
            loss = task.loss(model(torch.from_numpy(x)), torch.from_numpy(y))
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        shape = "x".join(map(str, data.input_shape))
        raise TaskError(
            f"model {model_name} cannot take samples of shape {shape} with --task {task.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TaskError(f"--task {task.name}: the loss must be one number (the mean over the batch), got {loss!r:.60}")
