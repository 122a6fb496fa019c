"""Which kernels computed a number: torch build, device, intra-op threads, CPU.

Float results of the same torch code differ between thread counts and CPUs (a matmul split
over 2 threads sums in another order than on 1), so "exact" compares runs only when these
match.  Pure: no I/O beyond reading /proc/cpuinfo.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Kernels:
    """What decides the float results of a gradient computed with torch."""

    torch: str
    device: str
    threads: int
    cpu: str

    def as_dict(self) -> dict:
        return asdict(self)


def current(device: str = "cpu") -> Kernels:
    """The kernels this process computes with now, on `device`."""
    return Kernels(torch=str(torch.__version__), device=device, threads=torch.get_num_threads(), cpu=cpu_model())


def worker_threads(workers: int) -> int:
    """The intra-op threads `pangea run` gives each of `workers` local worker processes."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 7B13'), or the machine type where Linux does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads (0: leave as is), restoring the count after."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def set_threads(n: int) -> None:
    """torch.set_num_threads(n) in this thread (0: leave as is).

    Always called, even when torch.get_num_threads() already says n: that count is the
    process's, while MKL (the matmuls) takes its count per thread, from the thread that set
    it; a thread that never set it multiplies on MKL's default (all cores).  Costs ~0.1 us
    when nothing changes.
    """
    if n > 0:
        torch.set_num_threads(n)


def compute_thread(n: int) -> ThreadPoolExecutor:
    """One thread for a role's torch computations, on `n` intra-op threads (0: this thread's count).

    A role that computes off its event loop must not use a thread that never set the count:
    measured, a fresh thread's 64x3000 @ 3000x200 matmul with 1 thread set ran on MKL's 2,
    1.1e-4 away from the 1-thread result, so a worker would not compute with the kernels it
    reports.  This one thread sets the count itself before its first task.
    """
    return ThreadPoolExecutor(
        1, thread_name_prefix="torch", initializer=set_threads, initargs=(n or torch.get_num_threads(),)
    )


def as_input(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A copy of `t` in memory torch allocated on `device` (64-byte aligned on the CPU).

    Decoded messages hand out views at whatever offset the tensor had in the message, and MKL
    may sum in another order for another alignment: a worker and the yardstick feed their
    kernels inputs laid out alike.
    """
    return t.to(device, copy=True)
