"""Random draws inside a step (dropout, stochastic depth, any `torch.rand` in a forward), keyed by
what the plan records.

Each shard's step runs on generators seeded from (seed, global batch, the shard's rows of it):
torch's (the CPU's, and the device's for CUDA), numpy's global one and Python's `random`, all
forked so that nothing before or after depends on them.  A worker, a re-issued attempt on another
worker, `pangea reference` and `pangea verify` therefore draw the same masks for the same rows,
whichever process computes them and whatever it computed before: the masks are part of what is
exact.  They do depend on the cut (rows 0..31 draw other masks than rows 0..63), as BatchNorm's
batch statistics do: a run equals its reference with the same K.  A generator a model keeps for
itself (a `torch.Generator` attribute, a `np.random.default_rng()` made at build time) is its own
state, not forked: draw from the global ones.

Randomness that must not depend on K (a diffusion model's noise, masked-LM masks) belongs with
the data, keyed per sample.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

_STEP = 0x53544550  # "STEP": keeps these seeds apart from any other use of the run's seed
_EVALUATION = 0x4556414C  # "EVAL"
_SAMPLE = 0x53414D50  # "SAMP"


def step_seed(seed: int, global_step: int, start: int, stop: int) -> int:
    """The seed of the step over rows [start, stop) of global batch `global_step` (a 63-bit int)."""
    return _derive(seed, _STEP, global_step, start, stop)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s transform in `epoch` (for its torch, numpy and Python draws)."""
    return _derive(seed, _SAMPLE, epoch, index)


def evaluation_seed(seed: int) -> int:
    """The seed of every evaluation of a run: a step that draws in eval mode gives the same figures
    in the run and in its reference."""
    return _derive(seed, _EVALUATION)


def _derive(*key: int) -> int:
    state = np.random.SeedSequence(list(key)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded(seed: int, device="cpu") -> Iterator[None]:
    """Run a block on torch's generators (the CPU's, and the device's if it is CUDA), numpy's global
    generator and Python's `random`, all seeded from `seed`, restoring their states after: the
    block's draws are a function of `seed` alone."""
    import torch  # here: a data worker whose samples need no seeding never imports it

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with _torch_forked(torch, seed, device):
            np.random.seed(seed & 0xFFFFFFFF)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def _torch_forked(torch, seed: int, device) -> Iterator[None]:
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield
