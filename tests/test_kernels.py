"""The kernels a role computes with are the ones it reports: thread counts reach MKL, inputs alike."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pangea.train import kernels


def _mkl_threads():
    """MKL's thread count as the calling thread sees it, or None where torch has no MKL."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_get_max_threads
    except (OSError, AttributeError):
        return None
    return get()


def _product():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 3000, generator=generator), torch.randn(3000, 200, generator=generator)
    return lambda: a @ b


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    kernels.set_threads(1)
    yield
    kernels.set_threads(before)


def test_the_compute_thread_multiplies_on_the_count_it_was_given(one_thread):
    """A thread that never set the count multiplies on MKL's default (all cores, measured 1.1e-4
    away from the 1-thread product on 2 cores); the compute thread sets it before its first task."""
    product = _product()
    here = product()
    with kernels.compute_thread(1) as pool:
        there = pool.submit(product).result()
        seen = pool.submit(_mkl_threads).result()
    assert torch.equal(here, there), (here - there).abs().max().item()
    if seen is not None:
        assert seen == 1


def test_a_plain_thread_does_not_inherit_the_count_where_mkl_decides():
    """Why the compute thread exists (MKL builds on machines with more than one core)."""
    if _mkl_threads() is None:
        pytest.skip("this torch build has no MKL (mkl_get_max_threads not exported)")
    before = torch.get_num_threads()
    kernels.set_threads(1)
    seen: list[int] = []
    try:
        thread = threading.Thread(target=lambda: seen.append(_mkl_threads()))
        thread.start()
        thread.join()
    finally:
        kernels.set_threads(before)
    if seen[0] == 1:
        pytest.skip("MKL's default here is 1 thread: nothing to show on a one-core machine")
    assert seen[0] > 1


def test_inputs_are_aligned_copies():
    raw = np.zeros(4 * 100 + 4, np.uint8)
    view = torch.from_numpy(raw[4:].view(np.float32))  # a decoded message's view at an odd offset
    copy = kernels.as_input(view, "cpu")
    assert copy.data_ptr() % 64 == 0 and copy.data_ptr() != view.data_ptr()
    assert torch.equal(copy, view)


@pytest.mark.parametrize(
    ("given", "runs_with"),
    [({}, "AUTO FALSE"), ({"MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "TRUE"}, "COMPATIBLE TRUE")],
)
def test_every_pangea_process_runs_mkl_reproducibly_unless_told_otherwise(given, runs_with):
    """Without MKL_CBWR, MKL's multi-threaded products may sum in another order in another
    process (measured: 3 processes in 37); with dynamic threading, on another thread count.
    Importing pangea turns reproducibility on and dynamic threading off; values the user set
    are left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")}
    out = subprocess.run(
        [sys.executable, "-c", "import os, pangea; print(os.environ['MKL_CBWR'], os.environ['MKL_DYNAMIC'])"],
        env={**env, **given},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == runs_with
