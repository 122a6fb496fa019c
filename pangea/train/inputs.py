"""What a step's batch holds: the wire's arrays as tensors on the worker's device.

Image bytes travel as uint8 (a quarter of float32's bytes) and become float32 here, the same way
on a worker, in `pangea reference` and at the orchestrator's evaluation: a uint8 `x` is divided by
255.  `--normalize` (imagenet, or MEANS/STDS) then makes a float `x` (x - mean) / std per channel
(dimension 1).  Every other tensor reaches the step in its own dtype (token ids as integers, masks
as bool): a uint8 `x` that is not image bytes (byte-sized token ids) belongs in a wider integer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from pangea.errors import SettingsError
from pangea.train import kernels

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalization(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(means, stds) of `--normalize` (None: none)."""
    if not spec:
        return None
    if spec == "imagenet":
        return IMAGENET
    try:
        means, stds = (tuple(float(v) for v in part.split(",")) for part in spec.split("/"))
    except ValueError:
        raise SettingsError(f"--normalize {spec}: MEANS/STDS, numbers separated by commas") from None
    if len(means) != len(stds) or not all(s > 0 for s in stds):
        raise SettingsError(f"--normalize {spec}: as many means as stds, every std > 0")
    return means, stds


def tensors(arrays: Mapping, device: torch.device | str, normalize: str = "") -> dict[str, torch.Tensor]:
    """Named arrays (numpy, or torch views of received payloads) as a step's batch on `device`."""
    out = {}
    for name, value in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        out[name] = kernels.as_input(tensor, device)
    x = out.get("x")
    if x is None:
        return out
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    spec = normalization(normalize)
    if spec is not None:
        if not x.is_floating_point():
            raise SettingsError(f"--normalize {normalize}: x is {x.dtype}, not image bytes or floats")
        means, stds = spec
        if x.dim() < 2 or x.shape[1] != len(means):
            raise SettingsError(f"--normalize {normalize}: {len(means)} channels, x has shape {tuple(x.shape[1:])}")
        shape = (1, len(means)) + (1,) * (x.dim() - 2)
        x = (x - torch.tensor(means, device=x.device).view(shape)) / torch.tensor(stds, device=x.device).view(shape)
    out["x"] = x
    return out
