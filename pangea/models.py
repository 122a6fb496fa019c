"""Built-in models and user models given as `module:factory`."""

from __future__ import annotations

import importlib
import inspect
import math

import torch
from torch import nn


class ModelError(ValueError):
    """A model spec that cannot be built, with a one-line reason."""


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden width, then a Linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_model(
    spec: str, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...], seed: int
) -> nn.Module:
    """Build the model deterministically: the same spec and seed give the same initial weights.

    A user factory `module:factory` is called as `factory(in_features=..., num_classes=...)`
    when it accepts those keywords, otherwise with no arguments.
    """
    in_features = math.prod(input_shape)
    torch.manual_seed(seed)
    if spec == "mlp":
        return mlp(in_features, num_classes, hidden)
    factory = _import_factory(spec)
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "in_features" in params:
        kwargs["in_features"] = in_features
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        raise ModelError(f"{spec}({', '.join(kwargs)}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"{spec} has no trainable parameters")
    return model


def _import_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"unknown model {spec!r}: use 'mlp' or 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name} has no callable {attr!r}")
    return factory
