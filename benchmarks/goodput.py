"""Goodput under failures: time to target when one worker is SIGKILLed every 15 s, `pangea run`
(which re-issues the dead worker's shard and restarts it) vs torch DDP under `torchrun
--max-restarts` (which stops every rank and restarts them all from the last checkpoint).

    python -m benchmarks.goodput                  # the LM to 3.0 bits/byte, a kill every 15 s: ~4 min
    python -m benchmarks.goodput --every 0        # the same without kills (each side's baseline)
    python -m benchmarks.goodput --workload mlp   # the 3M MLP to 0.97 on digits

The same workload on both sides, K=2 on loopback: benchmarks/lab.py's language model (byte-level
GPT, 0.45M parameters) to 3.0 validation bits/byte by default.  Not the digits MLPs: DDP takes
them to 0.97 in ~6 s, before the first kill, which would leave nothing to compare.

The kill schedule is the same on both sides: every `--every` seconds of a side's clock (from
its first step), one worker, the two in turn (Pangea's worker-0, worker-1, ...; DDP's rank 0,
rank 1, ...), gets SIGKILL; a kill that finds its victim not running (still starting again
after the previous one) is counted as missed and the schedule goes on.  Each side's clock runs
from its first step to the end of the first evaluation that meets the target (Pangea: its
orchestrator log; DDP: rank 0's, counted from the first start across every restart), so the
restarts' costs are inside it and the first start-up is not.
- Pangea: `pangea run` as a user runs it; its supervisor starts a killed worker again (each
  time: only a crash loop, 5 restarts within 60 s, stops it) and the orchestrator re-issues the dead worker's shard; nothing is rolled back.
- DDP: `torchrun --standalone --max-restarts 1000` over benchmarks/ddp_rank.py, which stores a
  checkpoint (model, optimizer, step) at every evaluation, i.e. each epoch's end and every
  `eval_every` steps (25 for the LM: more often than the usual checkpoint per epoch, which for
  the LM is 1033 steps away and sends every restart back to step 0; `--ddp-checkpoint epoch`
  measures that).  Its ranks rendezvous on torchrun's store under a prefix per restart (see
  ddp_rank._attempt_store: plain env:// hangs or fails on a restart with this torch).

    python -m benchmarks.goodput --ddp-checkpoint epoch   # DDP with a checkpoint per epoch
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import sides
from benchmarks.common import record
from benchmarks.lab import LM, MLP, Workload, with_corpus

K = 2
EVERY = 15.0
POLL = 0.2
WORKLOADS = {"lm": LM, "mlp": MLP}


@dataclass
class Outcome:
    evaluations: list[tuple[float, dict]] = field(default_factory=list)
    kills: int = 0
    missed: int = 0
    note: str = ""

    def seconds_to(self, workload: Workload) -> float | None:
        return next((s for s, f in self.evaluations if workload.met(f)), None)


class Killer:
    """SIGKILLs one victim every `every` seconds from `start`, the victims in turn; a victim is a
    pid that `victims()` reads fresh each time (restarts change it) and that still runs `marker`."""

    def __init__(self, every: float, victims, marker: str) -> None:
        self.every, self.victims, self.marker = every, victims, marker
        self.start: float | None = None
        self.kills = self.missed = 0

    def poll(self) -> None:
        if self.start is None or self.every <= 0:
            return
        due = int((time.monotonic() - self.start) // self.every)
        while self.kills + self.missed < due:
            pids = self.victims()
            pid = pids[(self.kills + self.missed) % len(pids)] if pids else 0
            if pid and _runs(pid, self.marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                    continue
            self.missed += 1


def _runs(pid: int, marker: str) -> bool:
    """Whether pid is alive and its command line holds marker (never signal a reused pid)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the side's process group (started in a session of its own), then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def pangea_side(workload: Workload, every: float, workdir: Path) -> Outcome:
    import json

    out = workdir / "run"
    pids = out / "pids.json"

    def workers() -> list[int]:
        try:
            named = json.loads(pids.read_text())
        except (OSError, ValueError):
            return []
        return [pid for name, pid in sorted(named.items()) if name.startswith("worker-")]

    killer = Killer(every, workers, "pangea worker")
    log = open(workdir / "pangea-run.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        sides.pangea_command(workload.train, K, out),
        env=sides.pangea_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def reached() -> bool:
        return any(workload.met(f) for _, f in sides.pangea_evaluations(out))

    outcome = Outcome(note=_watch(proc, log, killer, lambda: _started(out), reached, workload.timeout, "pangea run"))
    outcome.evaluations = sides.pangea_evaluations(out)
    outcome.kills, outcome.missed = killer.kills, killer.missed
    return outcome


def _watch(proc: subprocess.Popen, log, killer: Killer, started, reached, timeout: float, name: str) -> str:
    """Kill on the schedule (from `started()` on) until `reached()`, the process's end or the
    timeout; then stop the process and close its log.  The outcome's note ("" when all went well)."""
    deadline = time.monotonic() + timeout
    note = ""
    try:
        while True:
            if killer.start is None and started():
                killer.start = time.monotonic()
            if reached():
                break
            if proc.poll() is not None:
                note = f"{name} exited {proc.returncode}" if proc.returncode else ""
                break
            if time.monotonic() > deadline:
                note = f"stopped after {timeout:.0f} s"
                break
            killer.poll()
            time.sleep(POLL)
    finally:
        _stop(proc)
        log.close()
    return note


def _started(out: Path) -> bool:
    log = out / "logs" / "orchestrator.log"
    return log.exists() and "starting at round 0" in log.read_text(errors="replace")


def ddp_side(workload: Workload, every: float, workdir: Path, checkpoint_every: str = "evaluation") -> Outcome:
    checkpoint = workdir / "checkpoint"
    config = sides.ddp_config(
        workload, K, workdir, torchrun=True, checkpoint=str(checkpoint), checkpoint_every=checkpoint_every
    )

    def ranks() -> list[int]:
        pids = []
        for r in range(K):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int((checkpoint / f"rank{r}.pid").read_text()))
        return pids

    killer = Killer(every, ranks, "benchmarks.ddp_rank")
    log = open(workdir / "torchrun.log", "w")  # noqa: SIM115 - closed below
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(K),
        "--max-restarts",
        "1000",
        "-m",
        "benchmarks.ddp_rank",
        str(config),
    ]
    proc = subprocess.Popen(
        command, env=sides.ddp_env(), cwd=sides.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    started = (checkpoint / "clock").exists
    # The ranks stop themselves at the target: torchrun's exit is the end.
    outcome = Outcome(note=_watch(proc, log, killer, started, lambda: False, workload.timeout, "torchrun"))
    outcome.evaluations = sides.ddp_evaluations(workdir)
    outcome.kills, outcome.missed = killer.kills, killer.missed
    return outcome


def row(workload: Workload, every: float, name: str, outcome: Outcome, ddp_seconds: float | None) -> dict:
    seconds = outcome.seconds_to(workload)
    return {
        "workload": f"{workload.name} to {workload.figure} {'>=' if workload.higher else '<='} {workload.target:g}",
        "kill every s": every or "never",
        "side": name,
        "time to target s": seconds if seconds is not None else (outcome.note or "not reached"),
        "/ ddp": _ratio(seconds, ddp_seconds, workload.timeout),
        "kills": outcome.kills,
        "missed (victim restarting)": outcome.missed,
        "evaluations": len(outcome.evaluations),
    }


def _ratio(seconds: float | None, ddp_seconds: float | None, timeout: float) -> float | str:
    if seconds and ddp_seconds:
        return seconds / ddp_seconds
    if seconds and ddp_seconds is None:  # DDP ran the whole timeout without getting there
        return f"< {seconds / timeout:.2f} (ddp not there in {timeout:.0f} s)"
    return "n/a"


def run(workload: Workload = LM, every: float = EVERY, checkpoint_every: str = "evaluation") -> list[dict]:
    """One row per side: DDP first, then Pangea, on the same workload and kill schedule."""
    ddp = f"ddp torchrun restart-all, checkpoint every {checkpoint_every}"
    with tempfile.TemporaryDirectory(prefix="pangea-bench-goodput-") as tmp:
        workload = with_corpus(workload, Path(tmp))
        outcomes = {}
        ddp_run = functools.partial(ddp_side, checkpoint_every=checkpoint_every)
        for name, side in ((ddp, ddp_run), ("pangea run", pangea_side)):
            print(f"== {workload.name}, kill every {every or 'never'} s: {name} ...", flush=True)
            t0 = time.perf_counter()
            workdir = Path(tmp, name.split()[0])
            workdir.mkdir()
            outcome = side(workload, every, workdir)
            print(
                f"   {time.perf_counter() - t0:.0f} s with start-up; {outcome.kills} kills, {outcome.missed} missed; "
                f"evaluations {[(round(s, 1), round(f.get(workload.figure, float('nan')), 4)) for s, f in outcome.evaluations]}"
                f"{'; ' + outcome.note if outcome.note else ''}",
                flush=True,
            )
            outcomes[name] = outcome
        ddp_seconds = outcomes[ddp].seconds_to(workload)
        rows = [row(workload, every, name, outcome, ddp_seconds) for name, outcome in outcomes.items()]
    return rows


def goal_line(rows: list[dict]) -> str:
    pangea = next((r for r in rows if r["side"] == "pangea run"), None)
    ratio = pangea["/ ddp"] if pangea else "n/a"
    if isinstance(ratio, str):
        verdict = f"{ratio}: met" if ratio.startswith("<") and float(ratio.split()[1]) <= 0.5 else ratio
    else:
        verdict = f"{ratio:.2f}x ({'met' if ratio <= 0.5 else 'not met'})"
    every = rows[0]["kill every s"] if rows else "?"
    return f"goal: time to target with a worker killed every {every} s, Pangea/torchrun <= 0.5x: {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--every", type=float, default=EVERY, help=f"seconds between kills (0: none; default {EVERY:g})"
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="lm", help="lm (default) or mlp")
    parser.add_argument(
        "--ddp-checkpoint",
        choices=("evaluation", "epoch"),
        default="evaluation",
        help="when DDP stores its checkpoint: at every evaluation (default, every 25 steps for the LM) or each epoch's end",
    )
    parser.add_argument("--timeout", type=float, help="seconds a side may train before it is 'not reached'")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    if args.timeout:
        workload = Workload(**{**workload.__dict__, "timeout": args.timeout})
    rows = run(workload, args.every, args.ddp_checkpoint)
    # A variant keeps its own file: benchmarks.all's goodput.json (the default) stays as it ran.
    variant = [
        args.workload if args.workload != "lm" else "",
        f"every{args.every:g}" if args.every != EVERY else "",
        f"ddp-{args.ddp_checkpoint}" if args.ddp_checkpoint != "evaluation" else "",
    ]
    record("-".join(["goodput", *filter(None, variant)]), rows)
    print(goal_line(rows))


if __name__ == "__main__":
    main()
