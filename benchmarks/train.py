"""Time (and bytes) to 0.97 test accuracy on digits: Pangea vs torch DDP (gloo) with the same
K, global batch, optimizer, initial weights and batch order, for a small and a 3M-parameter MLP.

    python -m benchmarks.train              # the table, 3 runs of each side: ~15 min on 2 cores
    python -m benchmarks.train --runs 1     # one run of each: ~5 min
    python -m benchmarks.train --quick      # 1 epoch of the small MLP, target 0.5: the plumbing only
    python -m benchmarks.train --only 2048  # just the rows whose label contains "2048"

What is timed, the same on both sides: the training loop from its first step, once every
process is up (process and server start-up excluded), to the end of the first test evaluation
that reaches the target; the per-epoch evaluations (by Pangea's orchestrator; by DDP's rank 0
while the other ranks wait at the next all-reduce) are inside it. Pangea's clock is its
orchestrator log: "starting at round 0" to the evaluation line that gives test accuracy A
(`benchmarks.common.log_clock`; millisecond timestamps; a sync round's line comes after the
evaluation and the next parameter broadcast).
Without those lines, `total_seconds * e / epochs` from metrics.json stands in ("pro-rated"; it
also counts the wait for the workers to join). A diloco round may end several epochs: one
evaluation, after the whole round, then stands for all of them.

The DDP side (`ddp_train`): K ranks of benchmarks/ddp_rank.py, each started as a fresh process
(ranks forked from a process in which torch had started threads hung a run here for 15 minutes),
gloo over 127.0.0.1, the model Pangea builds with the same seed, its optimizer and schedule, and
global batch r cut into the shards Pangea's plans give K workers. A run has DDP_TIMEOUT seconds,
start-up included; a rank that fails, or a run past it, fails the row in one line. DDP
averages gradients equally over ranks while Pangea weights shards by samples: each rank's loss is scaled by K * shard / batch, which is 1 for equal shards
and makes the short last batch of an epoch exact too. Each rank gets cpu_count // K torch
threads, as `pangea run` gives its workers. Every mode row is set against this same plain DDP
(diloco's own inner and outer optimizers keep Pangea's defaults).

Bytes to the target: Pangea's `bytes_sent` (gradient bytes the workers published, summed over
workers; the parameter broadcasts are not in it) * e / epochs, "n/a" where metrics.json lacks
it. DDP's is modelled, not measured: a ring all-reduce of the gradient (gloo's algorithm) sends
2 (K-1)/K of it per rank per step, so 2 (K-1) * 4 * numel bytes per step over all ranks.

Real links are measured by benchmarks/lab.py (every worker on its own host behind a rate-limited
link, DDP's ranks on the same hosts, bytes from the kernel's counters).  What stays here is a
model, for a row someone adds by hand: `Config(delay=...)` runs `pangea run --net-delay` (each
worker publish waits that long) against DDP with one `time.sleep(delay)` per step per rank
before the backward pass (where the all-reduce happens), a lower bound, since a real ring would
pay the latency 2 (K-1) times.  No row of the table uses it.

Rows are `Config`s in `CONFIGS`: add one to add a row. Rows needing a flag that `pangea run
--help` does not show (the modes, the delay) are skipped with a printed line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import sides
from benchmarks.common import log_clock, record
from benchmarks.lab import Workload

TARGET = 0.97
RUN_TIMEOUT = 900  # seconds one `pangea run` may take before the row is marked failed
DDP_TIMEOUT = 900  # seconds the DDP ranks of one run may take, start-up included, before the row fails


@dataclass(frozen=True)
class Model:
    """An MLP on digits and the optimizer settings that take it past the target in `epochs`."""

    hidden: str
    lr: float
    optimizer: str
    epochs: int
    momentum: float = 0.9

    @property
    def numel(self) -> int:
        widths = [64, *map(int, self.hidden.split(",")), 10]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))


# Chosen with plain torch on the same batches (seed 0, batch 64): the small MLP first reaches
# 0.97 at epoch 8, the 3.02M one at epoch 4 (0.98), each a few test samples clear of the line.
# The small one's epochs are cheap: 20 give the modes room. The large one stops at 4: its epochs
# cost ~20 s each in Pangea on 2 cores (sync is exact: both sides reach it at the same epoch).
SMALL = Model("128", lr=0.15, optimizer="sgd", epochs=20)
LARGE = Model("2048,1400", lr=0.002, optimizer="adam", epochs=4)
DELAY = 0.02  # seconds: a modelled WAN delay, for rows added by hand (benchmarks/lab.py measures real links)


@dataclass(frozen=True)
class Config:
    """One row: a Pangea configuration, timed next to DDP with the same model, K, batch and delay."""

    model: Model
    workers: int = 2
    mode: str = "sync"
    local_steps: int | None = None  # diloco: inner steps between averages
    staleness: int | None = None  # async: bound on parameter staleness (None: Pangea's default)
    delay: float = 0.0
    batch_size: int = 64

    @property
    def label(self) -> str:
        mode = (
            self.mode
            + (f" H={self.local_steps}" if self.local_steps else "")
            + (f" S={self.staleness}" if self.staleness is not None else "")
        )
        delay = f" delay {self.delay * 1e3:g}ms" if self.delay else ""
        return f"mlp {self.model.hidden} K={self.workers} {mode}{delay}"

    def flags(self) -> list[str]:
        """The `pangea run` flags of this row beyond the model's."""
        flags = []
        if self.mode != "sync":
            flags += ["--mode", self.mode]
        if self.local_steps is not None:
            flags += ["--local-steps", str(self.local_steps)]
        if self.staleness is not None:
            flags += ["--staleness", str(self.staleness)]
        if self.delay:
            flags += ["--net-delay", str(self.delay)]
        return flags

    def ddp_key(self) -> tuple:
        """What the DDP reference depends on: rows sharing it share one DDP run."""
        return self.model, self.workers, self.batch_size, self.delay


CONFIGS = [
    Config(SMALL),
    Config(LARGE),  # the goal row: Pangea / DDP <= 1.5x
    *[Config(SMALL, mode="diloco", local_steps=h) for h in (5, 20, 100)],
    Config(SMALL, mode="async", staleness=2),
]
QUICK = [Config(Model(SMALL.hidden, SMALL.lr, SMALL.optimizer, epochs=1))]
QUICK_TARGET = 0.5


# ---------------------------------------------------------------- what both sides report


@dataclass
class Outcome:
    """Test accuracy per epoch, and each evaluation as (loop seconds when it ended, accuracy)."""

    accuracy: list[float]
    evaluations: list[tuple[float, float]]
    bytes_sent: float | None = None  # over the whole run
    params: dict[str, np.ndarray] = field(default_factory=dict)
    clock: str = "log"

    def reached(self, target: float) -> int | None:
        """1-based epoch whose evaluation first reached the target, or None."""
        return next((e + 1 for e, a in enumerate(self.accuracy) if a is not None and a >= target), None)

    def seconds_to(self, target: float) -> float | None:
        """Loop seconds at the end of the first evaluation that reached the target."""
        return next((s for s, a in self.evaluations if a >= target), None)

    def bytes_to(self, target: float) -> float | None:
        e = self.reached(target)
        return self.bytes_sent * e / len(self.accuracy) if e and self.bytes_sent is not None else None

    @property
    def final(self) -> float | None:
        return self.accuracy[-1] if self.accuracy else None


# ---------------------------------------------------------------- Pangea: `pangea run`


def run_flags() -> set[str]:
    """The flags `pangea run --help` shows (the modes may not exist yet)."""
    help_ = subprocess.run(
        [sys.executable, "-m", "pangea", "run", "--help"], capture_output=True, text=True, timeout=120
    )
    text = help_.stdout
    return set(re.findall(r"(--[a-z][a-z-]*)", text))


def pangea_train(config: Config, out: Path) -> Outcome | str:
    """Run `pangea run` for the row; its Outcome, or a one-line reason it failed."""
    model = config.model
    cmd = [
        sys.executable,
        "-m",
        "pangea",
        "run",
        "--dataset",
        "digits",
        "--workers",
        str(config.workers),
        "--hidden",
        model.hidden,
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(model.lr),
        "--momentum",
        str(model.momentum),
        "--optimizer",
        model.optimizer,
        "--epochs",
        str(model.epochs),
        "--seed",
        "0",
        "--out",
        str(out),
        *config.flags(),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PANGEA_NATS_URL", "PANGEA_JOB", "PANGEA_OUT")}
    env["PANGEA_LOG_FORMAT"] = "text"  # the clock reads the orchestrator's text log
    out.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"timed out after {RUN_TIMEOUT}s"
    metrics_path = out / "metrics.json"
    if done.returncode != 0 or not metrics_path.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"pangea run exited {done.returncode}: {' / '.join(tail)}"
    metrics = json.loads(metrics_path.read_text())
    accuracy = metrics.get("test_accuracy") or []
    log = out / "logs" / "orchestrator.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    evaluations = [(t, f["test_accuracy"]) for t, f in log_clock(text) if "test_accuracy" in f]
    clock = "log"
    if not evaluations:
        total = metrics.get("total_seconds") or math.nan
        evaluations = [(total * (e + 1) / len(accuracy), a) for e, a in enumerate(accuracy) if a is not None]
        clock = "pro-rated"
    params = {}
    if (out / "params.npz").exists():
        from pangea.train.outputs import load_params

        params = load_params(out / "params.npz")
    return Outcome(accuracy, evaluations, _total(metrics.get("bytes_sent")), params, clock)


def _total(bytes_sent) -> float | None:
    """`bytes_sent` of metrics.json, summed when it is given per worker; None when absent."""
    if isinstance(bytes_sent, dict):
        return float(sum(bytes_sent.values())) if bytes_sent else None
    return float(bytes_sent) if isinstance(bytes_sent, int | float) else None


# ---------------------------------------------------------------- DDP: torch.distributed, gloo


def ddp_train(config: Config, out: Path) -> Outcome | str:
    """Train the row's model with K DDP ranks (benchmarks/ddp_rank.py, each a fresh process);
    its Outcome, or a one-line reason it failed (a rank that exits with an error, or a run past
    DDP_TIMEOUT: every rank is then killed and the table goes on)."""
    model = config.model
    work = Workload(
        config.label,
        train={
            "dataset": "digits",
            "hidden": model.hidden,
            "lr": model.lr,
            "momentum": model.momentum,
            "optimizer": model.optimizer,
            "epochs": model.epochs,
            "batch_size": config.batch_size,
            "seed": 0,
        },
        figure="test_accuracy",
        target=2.0,  # never met: every epoch trains, and the table shows each one's accuracy
        higher=True,
        timeout=DDP_TIMEOUT,
    )
    path = sides.ddp_config(work, config.workers, out, params=str(out / "ddp-params.npz"), delay=config.delay)
    failed = sides.run_ddp_ranks(path, config.workers, DDP_TIMEOUT)
    if failed:
        return f"DDP failed: {failed}"
    evaluations = [(s, f["test_accuracy"]) for s, f in sides.ddp_evaluations(out)]
    per_epoch = json.loads((out / "ddp.json").read_text())["steps_per_epoch"]
    ring_bytes = 2 * (config.workers - 1) * 4 * model.numel  # a ring all-reduce of the gradient per step
    with np.load(out / "ddp-params.npz") as f:
        params = {k: f[k] for k in f.files}
    return Outcome([a for _, a in evaluations], evaluations, ring_bytes * per_epoch * model.epochs, params, "loop")


# ---------------------------------------------------------------- the table


def row(config: Config, pangea: Outcome | str, ddp: Outcome | str, target: float) -> dict:
    """The printed row: Pangea next to DDP, the ratio, and the sanity checks."""

    def number(outcome, what):
        if isinstance(outcome, str):
            return "failed"
        value = getattr(outcome, what)(target)
        return "not reached" if outcome.reached(target) is None else ("n/a" if value is None else value)

    p_s, d_s = number(pangea, "seconds_to"), number(ddp, "seconds_to")
    p_b, d_b = number(pangea, "bytes_to"), number(ddp, "bytes_to")
    both = isinstance(pangea, Outcome) and isinstance(ddp, Outcome)
    return {
        "config": config.label,
        "params": config.model.numel,
        "epochs to target pangea/ddp": "/".join(
            str(o.reached(target) or "-") if isinstance(o, Outcome) else "failed" for o in (pangea, ddp)
        ),
        "pangea s": p_s,
        "ddp s": d_s,
        "pangea/ddp time": p_s / d_s if isinstance(p_s, float) and isinstance(d_s, float) else "n/a",
        "pangea MB": p_b / 1e6 if isinstance(p_b, float) else p_b,
        "ddp MB (modelled)": d_b / 1e6 if isinstance(d_b, float) else d_b,
        "final acc pangea": pangea.final if isinstance(pangea, Outcome) and pangea.final is not None else "n/a",
        "final acc ddp": ddp.final if isinstance(ddp, Outcome) and ddp.final is not None else "n/a",
        "params max|diff|": _max_diff(pangea.params, ddp.params) if both else "n/a",
        "pangea clock": pangea.clock if isinstance(pangea, Outcome) else "-",
    }


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float | str:
    if not a or not b or a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return "n/a"
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def median_run(outcomes: list[Outcome | str], target: float) -> Outcome | str:
    """The run whose time to the target is the median (a failed or unreached run counts as the
    slowest); with an even count, the slower of the middle two."""

    def key(outcome) -> float:
        seconds = outcome.seconds_to(target) if isinstance(outcome, Outcome) else None
        return math.inf if seconds is None else seconds

    return sorted(outcomes, key=key)[len(outcomes) // 2]


def _seconds_each(outcomes: list[Outcome | str], target: float) -> str:
    each = [o.seconds_to(target) if isinstance(o, Outcome) else None for o in outcomes]
    return ", ".join("-" if s is None else f"{s:.2f}" for s in each)


def run(
    configs: list[Config] | None = None, target: float = TARGET, only: str | None = None, runs: int = 3
) -> list[dict]:
    """Time every configuration that this Pangea supports: `runs` runs of each side, interleaved
    (Pangea, DDP, Pangea, ...); one row each, of the median runs."""
    configs = [c for c in (configs or CONFIGS) if not only or only in c.label]
    available = run_flags() if any(c.flags() for c in configs) else set()
    if available and "--mode" not in available:
        print("modes are not available (`pangea run --help` has no --mode): only the sync rows run")
    rows, ddp_done = [], {}
    with tempfile.TemporaryDirectory(prefix="pangea-bench-train-") as tmp:
        for i, config in enumerate(configs):
            missing = [f for f in config.flags() if f.startswith("--") and f not in available]
            if missing:
                print(f"skip {config.label}: pangea run lacks {', '.join(missing)}")
                continue
            pangeas = []
            ddps = ddp_done.setdefault(config.ddp_key(), [])
            for j in range(runs):
                print(f"== {config.label}: pangea run ({j + 1}/{runs}) ...", flush=True)
                t0 = time.perf_counter()
                pangeas.append(pangea_train(config, Path(tmp, f"pangea-{i}-{j}")))
                print(f"   ({time.perf_counter() - t0:.0f}s with start-up)", flush=True)
                if len(ddps) < runs:  # a DDP run serves every row of the same model and batches
                    print(f"== {config.label}: DDP gloo ({j + 1}/{runs}) ...", flush=True)
                    t0 = time.perf_counter()
                    ddps.append(ddp_train(config, Path(tmp, f"ddp-{i}-{j}")))
                    print(f"   ({time.perf_counter() - t0:.0f}s with start-up)", flush=True)
            pangea, ddp = median_run(pangeas, target), median_run(ddps, target)
            for name, outcome in (("pangea", pangea), ("ddp", ddp)):
                if isinstance(outcome, str):
                    print(f"   {name}: {outcome}")
                else:
                    print(
                        f"   {name} (median run): accuracy per epoch {[round(a, 3) for a in outcome.accuracy]}; "
                        f"(seconds, accuracy) per evaluation {[(round(s, 1), round(a, 4)) for s, a in outcome.evaluations]}"
                    )
            rows.append(
                {
                    **row(config, pangea, ddp, target),
                    "runs": runs,
                    "pangea s each": _seconds_each(pangeas, target),
                    "ddp s each": _seconds_each(ddps, target),
                }
            )
    return rows


def goal_line(rows: list[dict]) -> str:
    """The figure to read: Pangea/DDP time to the target for the >= 3M-parameter MLP, sync."""
    for r in rows:
        if r["params"] >= 3_000_000 and r["config"].endswith(" sync"):
            ratio = r["pangea/ddp time"]
            verdict = "n/a" if isinstance(ratio, str) else f"{ratio:.2f}x ({'met' if ratio <= 1.5 else 'not met'})"
            return f"goal: time to target, Pangea/DDP <= 1.5x for the {r['params']:,}-parameter MLP: {verdict}"
    return "goal: no >= 3M-parameter sync row was run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch of the small MLP, target 0.5: plumbing only")
    parser.add_argument("--only", help="run only the rows whose label contains this text")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side per row, interleaved (default 3)")
    args = parser.parse_args()
    target = QUICK_TARGET if args.quick else TARGET
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = run(QUICK if args.quick else CONFIGS, target, args.only, 1 if args.quick else args.runs)
    print(
        f"target test accuracy {target}; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(2 cores shared: wall times move with it); {time.perf_counter() - started:.0f}s in all"
    )
    record("train-quick" if args.quick else "train", rows)
    print(goal_line(rows))
    for r in rows:
        if isinstance(r["final acc pangea"], float) and isinstance(r["final acc ddp"], float):
            print(
                f"sanity: {r['config']}: final test accuracy pangea {r['final acc pangea']:.4f} vs "
                f"ddp {r['final acc ddp']:.4f} (diff {abs(r['final acc pangea'] - r['final acc ddp']):.4f})"
            )


if __name__ == "__main__":
    main()
