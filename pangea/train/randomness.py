"""Random draws inside a step (dropout, stochastic depth, any `torch.rand` in a forward), keyed by
what the plan records.

Each shard's step runs on torch's generator seeded from (seed, global batch, the shard's rows of
it), forked so that nothing before or after depends on it.  A worker, a re-issued attempt on
another worker, `pangea reference` and `pangea verify` therefore draw the same masks for the same
rows, whichever process computes them and whatever it computed before: the masks are part of
what is exact.  They do depend on the cut (rows 0..31 draw other masks than rows 0..63), as
BatchNorm's batch statistics do: a run equals its reference with the same K.

Randomness that must not depend on K (a diffusion model's noise, masked-LM masks) belongs with
the data, keyed per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

_STEP = 0x53544550  # "STEP": keeps these seeds apart from any other use of the run's seed


def step_seed(seed: int, global_step: int, start: int, stop: int) -> int:
    """The seed of the step over rows [start, stop) of global batch `global_step` (a 63-bit int)."""
    state = np.random.SeedSequence([seed, _STEP, global_step, start, stop]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str) -> Iterator[None]:
    """Run a block on torch's generators (the CPU's, and the device's if it is CUDA) seeded with
    `seed`, restoring their states after: the block's draws are a function of `seed` alone."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield
