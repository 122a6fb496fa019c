"""Language-model throughput: tokens/s of `pangea run` vs torch DDP (gloo) on loopback, with the
same K, global batches, initial weights and optimizer (the train benchmark's LM row).

    python -m benchmarks.tokens             # 3 runs of each side, interleaved: ~3 min on 2 cores
    python -m benchmarks.tokens --runs 1    # one of each

The workload is benchmarks/lab.py's language model (README's byte-level GPT, 0.45M parameters,
context 128, 32 windows per step, AdamW with warmup and cosine, clipping) on this Python's
standard library as a corpus, for `STEPS` steps with an evaluation every 25 (on both sides:
the evaluations are inside the clock).  Each side's clock runs from its first step (Pangea:
the orchestrator log's "starting at round 0"; DDP: rank 0's perf_counter after the barrier) to
its last evaluation, and tokens/s = steps * 32 * 128 / that.  The DDP side is
benchmarks/ddp_rank.py: K ranks, cpu_count // K torch threads each, as `pangea run` gives its
workers.  Sync Pangea computes what DDP computes, so both sides' validation figures should
agree: `max |bits/byte diff|` over the evaluations is the check that they trained the same
thing (not 0 in general: DDP averages over ranks in another order).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import sides
from benchmarks.common import record
from benchmarks.lab import LM, Workload, with_corpus

K = 2
STEPS = 100
RUN_TIMEOUT = 600


def workload(steps: int = STEPS) -> Workload:
    """The lab's LM for `steps` steps, with a target no run meets (every side trains them all)."""
    return Workload(**{**LM.__dict__, "train": {**LM.train, "max_steps": steps}, "target": -1.0})


def tokens_per_second(evaluations: list[tuple[float, dict]], step_key: str, tokens_per_step: int) -> float | None:
    """Tokens trained up to the last evaluation over its seconds."""
    if not evaluations:
        return None
    seconds, figures = evaluations[-1]
    return figures[step_key] * tokens_per_step / seconds


def pangea_side(work: Workload, workdir: Path) -> tuple[float | None, list, str]:
    out = workdir / "run"
    try:
        done = subprocess.run(
            sides.pangea_command(work.train, K, out),
            env=sides.pangea_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return None, [], f"timed out after {RUN_TIMEOUT} s"
    evaluations = sides.pangea_evaluations(out)
    note = "" if done.returncode == 0 else f"pangea run exited {done.returncode}"
    return tokens_per_second(evaluations, "round", _tokens_per_step(work)), evaluations, note


def ddp_side(work: Workload, workdir: Path) -> tuple[float | None, list, str]:
    note = sides.run_ddp_ranks(sides.ddp_config(work, K, workdir), K, RUN_TIMEOUT)
    evaluations = sides.ddp_evaluations(workdir)
    return tokens_per_second(evaluations, "step", _tokens_per_step(work)), evaluations, note


def _tokens_per_step(work: Workload) -> int:
    return int(work.train["batch_size"]) * int(work.train.get("context", 128))


def _max_diff(a: list, b: list, figure: str) -> float | str:
    """Largest |difference| of the figure at the steps both sides evaluated."""
    left = {int(f["round"]): f[figure] for _, f in a}
    right = {int(f["step"]): f[figure] for _, f in b}
    common = left.keys() & right.keys()
    return max(abs(left[s] - right[s]) for s in common) if common else "n/a"


def run(runs: int = 3, steps: int = STEPS) -> list[dict]:
    """One row: the medians of `runs` interleaved runs of each side, and their ratio."""
    got: dict[str, list[float]] = {"pangea": [], "ddp": []}
    evaluations: dict[str, list] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pangea-bench-tokens-") as tmp:
        work = with_corpus(workload(steps), Path(tmp))
        for i in range(runs):
            for name, side in (("pangea", pangea_side), ("ddp", ddp_side)):
                t0 = time.perf_counter()
                rate, evals, note = side(work, Path(tmp, f"{name}-{i}"))
                print(
                    f"   {name} run {i + 1}: {rate or 0:,.0f} tokens/s ({time.perf_counter() - t0:.0f} s with "
                    f"start-up){'; ' + note if note else ''}",
                    flush=True,
                )
                if rate is not None:
                    got[name].append(rate)
                    evaluations[name] = evals
                if note:
                    notes.append(f"{name}: {note}")
    pangea = statistics.median(got["pangea"]) if got["pangea"] else None
    ddp = statistics.median(got["ddp"]) if got["ddp"] else None
    both = "pangea" in evaluations and "ddp" in evaluations
    return [
        {
            "workload": f"lm gpt 0.45M, K={K}, {steps} steps of {_tokens_per_step(work):,} tokens",
            "runs": runs,
            "pangea tokens/s": pangea if pangea is not None else "failed",
            "ddp tokens/s": ddp if ddp is not None else "failed",
            "pangea/ddp": pangea / ddp if pangea and ddp else "n/a",
            "max |bits/byte diff|": (
                _max_diff(evaluations["pangea"], evaluations["ddp"], "bits_per_byte") if both else "n/a"
            ),
            "notes": "; ".join(notes) or "-",
        }
    ]


def goal_line(rows: list[dict]) -> str:
    ratio = rows[0]["pangea/ddp"] if rows else "n/a"
    verdict = "n/a" if isinstance(ratio, str) else f"{ratio:.2f} ({'met' if ratio >= 0.7 else 'not met'})"
    return f"goal: LM tokens/s, Pangea/DDP >= 0.7 at K={K}: {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, interleaved (default 3)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (default {STEPS})")
    args = parser.parse_args()
    rows = run(args.runs, args.steps)
    record("tokens", rows)
    print(goal_line(rows))


if __name__ == "__main__":
    main()
