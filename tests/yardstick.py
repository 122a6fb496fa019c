"""Exactness checks for tests: a run against `pangea reference --workers K`, or against its own plans.

"Exact" (README, pangea/train/exactness.py): equal to one process that computes the same shards
with the same kernels and sums them the same way.  Runs with a fixed set of K workers compare
with `reference(workers=K)`; runs whose membership changed, or that were killed, re-issued,
resumed or replayed, with `assert_verified`, which recomputes exactly the rounds they recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pangea.train.exactness import compare, verify

# Measured with matching kernels: 0.0 for sync (SGD, Adam) and diloco runs on these machines;
# the bound leaves room for the one float rounding that remains (the float64 sum of three or
# more shards depends on the order their chunks arrive in).
TOLERANCE = 1e-6


# The yardstick in a process of its own: `train_reference` on exactly these settings.
_REFERENCE = (
    "import json, sys; from pangea.settings import ReferenceSettings; "
    "from pangea.train.reference import train_reference; "
    "train_reference(ReferenceSettings(**json.loads(sys.argv[1])))"
)


def reference(out: Path, *, workers: int = 2, **train) -> Path:
    """`pangea reference --workers K` on pangea run's kernels for K, in a fresh process; its output dir.

    Not in the test process: after hundreds of tests its torch has been through every thread
    count and library those tests touched, and twice in CI a run differed from an in-process
    reference that a fresh process (and the same test alone) matched.  A fresh interpreter is
    what a user's `pangea reference` is, too."""
    settings = json.dumps({"out": str(out), "workers": workers, **train}, default=str)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # user tasks included
    result = subprocess.run(
        [sys.executable, "-c", _REFERENCE, settings], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"the reference failed: {result.stderr[-3000:]}"
    return out


def assert_exact(run_dir: Path, reference_dir: Path) -> float:
    """The run's params.npz equals the reference's (their kernels must match); max |Δ|."""
    diff = compare(run_dir, reference_dir)
    assert diff <= TOLERANCE, f"max |run - reference| = {diff:g}"
    return diff


def assert_verified(run_dir: Path, out: Path | None = None) -> float:
    """`pangea verify run_dir`: the run equals the recomputation of its recorded plans; max |Δ|."""
    verdict = verify(run_dir, tolerance=TOLERANCE, out=out)
    assert verdict.exact, verdict.line()
    return verdict.max_abs_diff
