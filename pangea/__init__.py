"""Pangea: data-parallel PyTorch training over NATS JetStream, exact to a single-process reference.

MKL (torch's CPU matmuls) may split a multi-threaded product differently from one process
to the next, and so sum in another order: measured on a 2-core Xeon, a 44-step Adam run on
2 threads came out otherwise in 3 of 37 processes (1.6e-4 twice, 2.2e-6 once from the others),
never on 1 thread (0 of 68) nor with MKL's conditional numerical reproducibility on (0 of
90).  Every Pangea process therefore runs MKL with `MKL_CBWR=AUTO` (the fastest code path
for this CPU, the same every run; matmul speed unchanged within noise) unless the variable
is already set.  MKL reads it at its first call, so this holds as long as no matmul ran
before `pangea` was imported.

With it, `MKL_DYNAMIC=FALSE`: MKL's reproducibility holds for a fixed thread count, and with
dynamic threading (its default) MKL may use fewer threads than asked on a loaded machine.  In
CI (2 busy cores) runs still came out otherwise now and then with CBWR alone; whether this is
that cause is not proven.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

# Pangea from Python (`pangea.fit`, ...), imported when first used: `import pangea` stays light.
_API = ("fit", "reference", "verify", "Run")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from pangea.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'pangea' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
