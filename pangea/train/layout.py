"""A model's state as one flat float32 vector: what travels on the bus.

The vector is the trainable parameters (in `named_parameters` order: the optimizer's part)
followed by the buffers (in `named_buffers` order: BatchNorm running statistics and the like,
state that is not trained but must be the same everywhere).  A gradient message carries the
same layout: the parameters' gradients, then the buffers as the shard's forward left them, so
the orchestrator's one pass gives the mean gradient (the summed gradients over the summed
counts, `pangea.train.aggregate`) and the mean running statistics (weighted by rows).  Integer buffers (`num_batches_tracked`) travel as float32 (exact
below 2**24) and are rounded back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the trainable parameters, then of the buffers."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int  # the whole vector: parameters and buffers
    param_numel: int = -1  # the parameters' part (-1: all of it)
    buffer_names: tuple[str, ...] = ()
    buffer_dtypes: tuple[str, ...] = ()

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
        params = total
        buffer_names, dtypes = [], []
        for name, b in model.named_buffers():
            if not (b.is_floating_point() or b.dtype in (torch.int64, torch.int32)):
                continue
            names.append(name)
            shapes.append(tuple(b.shape))
            offsets.append(total)
            buffer_names.append(name)
            dtypes.append(str(b.dtype).removeprefix("torch."))
            total += b.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), total, params, tuple(buffer_names), tuple(dtypes))

    def __post_init__(self) -> None:
        if self.param_numel < 0:
            object.__setattr__(self, "param_numel", self.numel)

    @property
    def has_buffers(self) -> bool:
        return bool(self.buffer_names)

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.names[: len(self.names) - len(self.buffer_names)]

    @property
    def hash(self) -> str:
        """Fingerprint of names and shapes: messages for another model are refused."""
        text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(self.names, self.shapes))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def params(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.param_names]

    def buffers(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_buffers())
        return [named[n] for n in self.buffer_names]

    def flatten_params(self, model: nn.Module) -> np.ndarray:
        """A float32 copy of the model's state: parameters, then buffers."""
        return self._flatten([p.detach() for p in self.params(model)] + self.buffers(model))

    def flatten_grads(self, model: nn.Module) -> np.ndarray:
        """A float32 copy of all gradients (zeros where a parameter got none), then the buffers."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params(model)]
        return self._flatten(grads + self.buffers(model))

    def load_params(self, model: nn.Module, flat: np.ndarray) -> None:
        """Copy a flat state vector into the model's parameters and buffers."""
        self._check(flat)
        with torch.no_grad():
            for t, piece in zip(self.params(model) + self.buffers(model), self.split(flat)):
                t.copy_(_like(piece, t))

    def load_buffers(self, model: nn.Module, flat: np.ndarray) -> None:
        """Copy the buffer part of a flat vector (a round's mean) into the model's buffers."""
        self._check(flat)
        start = len(self.names) - len(self.buffer_names)
        with torch.no_grad():
            for t, piece in zip(self.buffers(model), self.split(flat)[start:]):
                t.copy_(_like(piece, t))

    def set_grads(self, model: nn.Module, flat: np.ndarray, copy: bool = True) -> None:
        """Set each parameter's .grad from the parameter part of a flat vector.

        copy=False: the gradients are views of `flat` (float32, writable, contiguous), which
        the caller must then leave alone; it saves a model-sized copy at the orchestrator."""
        self._check(flat)
        share = not copy and flat.dtype == np.float32 and flat.flags.writeable and flat.flags.c_contiguous
        for p, piece in zip(self.params(model), self.split(flat)):
            piece = piece if share else np.array(piece, dtype=np.float32)
            p.grad = torch.from_numpy(piece).view(p.shape).to(p.device)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Views of the flat vector, one per parameter, then one per buffer."""
        ends = list(self.offsets[1:]) + [self.numel]
        return [flat[a:b] for a, b in zip(self.offsets, ends)]

    def named_arrays(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{name: array of its shape}: parameters float32, buffers in their own dtype (params.npz)."""
        kinds = dict(zip(self.buffer_names, self.buffer_dtypes))
        return {
            n: _as_numpy(piece, kinds.get(n, "float32")).reshape(s)
            for n, s, piece in zip(self.names, self.shapes, self.split(flat))
        }

    def _flatten(self, tensors: list[torch.Tensor]) -> np.ndarray:
        if not tensors:
            return np.zeros(0, np.float32)
        return torch.cat([t.reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()

    def _check(self, flat: np.ndarray) -> None:
        if flat.shape != (self.numel,):
            raise ValueError(f"flat vector has shape {flat.shape}, layout needs ({self.numel},)")


def _like(piece: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """A float32 slice as `t`'s shape and dtype (integer buffers rounded, not truncated)."""
    values = torch.from_numpy(np.asarray(piece, np.float32)).view(t.shape)
    if not t.is_floating_point():
        values = values.round()
    return values.to(t.device, t.dtype)


def _as_numpy(piece: np.ndarray, dtype: str) -> np.ndarray:
    """Integer buffers as their own dtype; every float as float32 (numpy has no bfloat16)."""
    return np.rint(piece).astype(dtype) if dtype.startswith("int") else np.asarray(piece, np.float32)
