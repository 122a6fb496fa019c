"""What is learned: the step a shard's gradient comes from, where its samples come from, how a
model is judged.

- `classify` (default): cross-entropy of (batch, classes) logits against integer labels of an
  in-memory data set (digits, .npz); judged by test accuracy.
- `lm`: next-token cross-entropy over windows of a token file (`pangea.train.tokens`), summed over
  every target token; judged by validation loss, bits per token (per byte for a .txt, whose tokens
  are bytes) and perplexity.
- `module:function`: a user's `function(output, target) -> loss`, the mean over the samples of
  the batch it is given, on an .npz whose targets may be anything numeric; judged by test loss.

Each is a step (`pangea.train.steps`): the loss summed over the shard's counted targets, and
their count.  `--step module:function` replaces the task's step with the user's own (several
inputs, masks, a model that computes its loss); the task still says where the data comes from
and how the model is judged (the step's mean loss, and accuracy for `classify`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pangea.errors import TaskError
from pangea.train import inputs, steps, usercode
from pangea.train.data import Dataset
from pangea.train.tokens import TokenData

Loss = steps.Loss


def classify_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch's samples."""
    return nn.functional.cross_entropy(output, target)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every target of every window: logits (B, T, V), target (B, T)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass(frozen=True)
class Task:
    name: str  # classify, lm, or the user loss's spec
    step: steps.Step
    headline: str  # the evaluation figure a progress bar shows
    step_name: str = ""  # how messages name the step: "--step mod:fn", or the task's

    @property
    def is_lm(self) -> bool:
        return self.name == "lm"

    @property
    def label(self) -> str:
        return self.step_name or f"--task {self.name}"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset | TokenData, normalize: str = "") -> dict[str, float]:
        """The model's figures on held-out data (test set, or validation windows), in eval mode:
        the step's mean loss over counted targets, and accuracy for `classify`."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum, count, correct, samples = 0.0, 0.0, 0, 0
        for rows in data.eval_rows():
            batch = inputs.tensors(rows, device, normalize)
            labels = self.name == "classify" and batch["y"].ndim == 1 and not batch["y"].is_floating_point()
            output = steps.logits(steps.forward(model, batch)) if labels else None
            if output is not None:  # a user step on other targets has no accuracy
                correct += int((output.argmax(1) == batch["y"]).sum())
                samples += len(batch["y"])
            if output is not None and self.step is steps.classify:  # its forward is the one above
                loss, n = nn.functional.cross_entropy(output, batch["y"], reduction="sum"), len(batch["y"])
            else:
                loss, n = steps.run(self.step, model, batch, self.label)
            loss_sum += float(loss)
            count += n
        model.train(was_training)
        loss = loss_sum / count if count else math.nan
        if samples:
            return {"test_accuracy": correct / samples, "test_loss": loss}
        if self.is_lm:
            figures = {"val_loss": loss, "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 700))}
            if data.bytes_per_token:
                figures["bits_per_byte"] = figures["bits_per_token"] / data.bytes_per_token
            return figures
        return {"test_loss": loss}


def get_task(spec: str, step: str = "", *, code_dir: Path | None = None, allow_pickle: bool = True) -> Task:
    """`classify`, `lm`, or `module:function` (a mean loss of (output, target)); with `step`, the
    user's step (`module:function`) in place of the task's own."""
    if spec == "classify":
        task = Task("classify", steps.classify, "test_accuracy")
    elif spec == "lm":
        task = Task("lm", steps.lm, "val_loss")
    else:
        task = Task(spec, steps.of_loss(_user_loss(spec, code_dir, allow_pickle)), "test_loss")
    if step:
        # Its figure is the step's own loss (accuracy, when the targets are labels, is in the metrics).
        headline = "val_loss" if task.is_lm else "test_loss"
        task = Task(task.name, _user_step(step, code_dir, allow_pickle), headline, f"--step {step}")
    return task


def _user_loss(spec: str, code_dir: Path | None, allow_pickle: bool) -> Loss:
    if ":" not in spec:
        raise TaskError(f"unknown --task {spec!r}: use classify, lm or module:function")
    function = usercode.resolve(spec, what="--task", error=TaskError, code_dir=code_dir, allow_pickle=allow_pickle)
    _signature(
        function,
        spec,
        "--task",
        (torch.zeros(1), torch.zeros(1)),
        "(output, target) and return the mean loss over the batch",
    )
    return function


def _user_step(spec: str, code_dir: Path | None, allow_pickle: bool) -> steps.Step:
    function = usercode.resolve(spec, what="--step", error=TaskError, code_dir=code_dir, allow_pickle=allow_pickle)
    _signature(function, spec, "--step", (nn.Module(), {}), "(model, batch) and return (loss_sum, count)")
    return function


def _signature(function, spec: str, what: str, args: tuple, contract: str) -> None:
    if not callable(function):
        raise TaskError(f"{what} {spec} is not callable")
    try:
        inspect.signature(function).bind(*args)
    except TypeError:
        raise TaskError(f"{what} {spec}: {inspect.signature(function)} must take {contract}") from None
    except ValueError:  # no signature to read (a builtin): let the probe judge it
        pass


def probe(task: Task, model: nn.Module, data: Dataset | TokenData, model_name: str, normalize: str = "") -> None:
    """One training sample and one evaluation sample through the model and the step, before any
    process relies on them: a mismatch (a context longer than the model's, a step that returns no
    scalar, a transform that cannot take an evaluation sample) is one line, not a crash an epoch in."""
    batches = [data.rows(0, 1, 0, 0, 1), next(iter(data.eval_rows(1)), None)]
    was_training = model.training
    model.eval()  # touches no running statistics, and takes a batch of one
    try:
        with torch.no_grad():
            for rows in filter(None, batches):
                steps.run(task.step, model, inputs.tensors(rows, "cpu", normalize), task.label)
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        shape = "x".join(map(str, data.input_shape))
        raise TaskError(
            f"model {model_name} cannot take samples of shape {shape} with {task.label}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
