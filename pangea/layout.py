"""A model's trainable parameters as one flat float32 vector: what travels on the bus."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the trainable parameters, in `named_parameters` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        names, shapes, offsets, total = [], [], [], 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(total)
            total += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), total)

    @property
    def hash(self) -> str:
        """Fingerprint of names and shapes: messages for another model are refused."""
        text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(self.names, self.shapes))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def params(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def flatten_params(self, model: nn.Module) -> np.ndarray:
        """A float32 copy of all parameters."""
        return self._flatten([p.detach() for p in self.params(model)])

    def flatten_grads(self, model: nn.Module) -> np.ndarray:
        """A float32 copy of all gradients (zeros where a parameter got none)."""
        return self._flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params(model)]
        )

    def load_params(self, model: nn.Module, flat: np.ndarray) -> None:
        """Copy a flat vector into the model's parameters."""
        self._check(flat)
        with torch.no_grad():
            for p, piece in zip(self.params(model), self.split(flat)):
                p.copy_(torch.from_numpy(piece).view(p.shape))

    def set_grads(self, model: nn.Module, flat: np.ndarray, copy: bool = True) -> None:
        """Set each parameter's .grad from a flat vector.

        copy=False: the gradients are views of `flat` (float32, writable, contiguous), which
        the caller must then leave alone; it saves a model-sized copy at the orchestrator."""
        self._check(flat)
        share = not copy and flat.dtype == np.float32 and flat.flags.writeable and flat.flags.c_contiguous
        for p, piece in zip(self.params(model), self.split(flat)):
            piece = piece if share else np.array(piece, dtype=np.float32)
            p.grad = torch.from_numpy(piece).view(p.shape).to(p.device)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Views of the flat vector, one per parameter."""
        ends = list(self.offsets[1:]) + [self.numel]
        return [flat[a:b] for a, b in zip(self.offsets, ends)]

    def named_arrays(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{name: float32 array of the parameter's shape}: the contents of params.npz."""
        return {n: np.asarray(piece, np.float32).reshape(s) for n, s, piece in zip(self.names, self.shapes, self.split(flat))}

    def _flatten(self, tensors: list[torch.Tensor]) -> np.ndarray:
        if not tensors:
            return np.zeros(0, np.float32)
        return torch.cat([t.reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()

    def _check(self, flat: np.ndarray) -> None:
        if flat.shape != (self.numel,):
            raise ValueError(f"flat vector has shape {flat.shape}, layout needs ({self.numel},)")
