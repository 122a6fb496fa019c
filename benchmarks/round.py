"""One aggregation round of `pangea run` (K workers, P parameters, a compression mode, S
orchestrator shards) vs torch.distributed gloo `all_reduce` of the same float32 tensor across
K processes; and the orchestrator's peak RSS above its idle RSS, as a multiple of the model.

    python -m benchmarks.round                 # the default matrix: 9 runs, 12 min on a shared 2-core box
    python -m benchmarks.round --quick         # one tiny run: a smoke test
    python -m benchmarks.round --k 4 --params 25e6 --compression none,int8 --shards 1

Each row is one real `pangea run` (every role its own process, on a fresh nats-server) of an
MLP on 64 inputs and 10 classes whose two hidden widths give ~P parameters, over a small
dataset cut from digits so the run has a few rounds.  Columns:

  pangea_round_s    median time between the orchestrator's consecutive round-done events,
                    rounds after the first two: one optimizer step as a user waits for it
                    (plan, shards, forward/backward, gradients in, mean, step, params out)
  metrics_round_s   the same rounds' `round_seconds` from metrics.json, the orchestrator's
                    own timer (before 7602bb5 it stopped at the optimizer step: no broadcast)
  compute_s         one shard's forward+backward+flatten in this process, same model, shard
                    size and torch threads as a worker: the part of a round that is not talk
  gloo_allreduce_s  median all_reduce of a float32 tensor of P elements across K processes
  pangea / gloo     pangea_round_s / gloo_allreduce_s (gloo always fp32)
  cpu_<kind>_s       CPU seconds per timed round of each kind of process, all of that kind
                    together: workers, orchestrator, reducers (S > 1), preprocessor, nats
                    (the nats-server); the biggest is where the next change should go
  all_cpu_s         their sum: next to cores x pangea_round_s it shows how much of the
                    machine the run got
  peak_rss_over_model  (orchestrator VmHWM - its idle RSS: the lowest from the job spec's
                    appearance on the bus, the model built, to the start of round 0) / (4 P bytes)
  idle_mb, peak_mb  those two RSS figures
  msgs_in, msgs_out messages into and out of the nats-server per timed round (its /varz
                    in_msgs and out_msgs: publishes, acks, pull requests, deliveries, replies)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import best_of, machine, record

REPO = Path(__file__).resolve().parent.parent
IN_FEATURES, CLASSES = 64, 10
BATCH = 64  # global batch: K workers share it
RUN_TIMEOUT = 900.0
SAMPLE_SECONDS = 0.02  # RSS sampling period


@dataclass(frozen=True)
class Config:
    k: int
    params: int  # requested P; the model's exact numel is reported
    compression: str = "none"
    shards: int = 1


# ---------------------------------------------------------------- the model and the data


def hidden_for(params: int) -> tuple[int, int]:
    """Two equal hidden widths h whose MLP (64 -> h -> h -> 10) has the nearest numel to `params`."""
    # numel = 64h + h + h*h + h + 10h + 10 = h^2 + 76h + 10
    h = round((-76 + math.sqrt(76 * 76 - 4 * (10 - params))) / 2)
    return max(1, h), max(1, h)


def numel(hidden: tuple[int, ...]) -> int:
    widths = (IN_FEATURES, *hidden, CLASSES)
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def write_dataset(path: Path, rounds: int) -> None:
    """Digits cut to `rounds` global batches of training data (one epoch = `rounds` rounds)."""
    from pangea.train.data import load_dataset

    digits = load_dataset("digits")
    n = rounds * BATCH
    if n > len(digits.x_train):
        raise SystemExit(f"--rounds {rounds}: digits has only {len(digits.x_train) // BATCH} batches of {BATCH}")
    np.savez(
        path,
        x_train=digits.x_train[:n],
        y_train=digits.y_train[:n],
        x_test=digits.x_test[:BATCH],
        y_test=digits.y_test[:BATCH],
    )


def worker_threads(k: int) -> int:
    """Torch threads `pangea run` gives each of K workers (see Supervisor._supervise)."""
    return max(1, (os.cpu_count() or 1) // k)


def compute_seconds(k: int, hidden: tuple[int, ...]) -> float:
    """One shard's forward+backward+flatten, as a worker computes it (same threads, shard size)."""
    import torch

    from pangea.train.layout import Layout
    from pangea.train.models import build_model
    from pangea.train.tasks import classify_loss as loss_fn

    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads(k))
    try:
        model = build_model("mlp", (IN_FEATURES,), CLASSES, hidden, 0)
        layout = Layout.of(model)
        rows = BATCH // k
        x = torch.rand(rows, IN_FEATURES)
        y = torch.randint(0, CLASSES, (rows,))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            layout.flatten_grads(model)

        return best_of(step, repeat=3)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the reference: gloo


def _gloo_rank(rank: int, world: int, port: int, size: int, iters: int, results) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tensor = torch.ones(size, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(tensor)
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a round lasts until the slowest rank
            times.append(float(elapsed))
        if rank == 0:
            results.put(statistics.median(times))
    finally:
        dist.destroy_process_group()


def gloo_allreduce_seconds(k: int, size: int, iters: int) -> float:
    """Median seconds of a gloo all_reduce of `size` float32 across `k` local processes."""
    import torch.multiprocessing as mp

    from pangea.bus.server import free_port

    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_gloo_rank, args=(k, free_port(), size, iters, results), nprocs=k, start_method="spawn")
    return results.get()


# ---------------------------------------------------------------- pangea run


def shards_supported() -> bool:
    """Whether this tree's `pangea run` has --shards (orchestrator shards)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "pangea", "run", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    ).stdout
    return "--shards" in help_text


EXTRA_ENV: dict[str, str] = {}  # --set: PANGEA_* settings of every run (a variant to compare)


def _env() -> dict[str, str]:
    """The environment of `pangea run`: this tree's pangea first, no PANGEA_* of the caller but --set's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")} | EXTRA_ENV
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes ({} once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids(out: Path) -> dict[str, int]:
    """Role -> pid, from the pids.json `pangea run` writes ({} until it exists)."""
    try:
        return json.loads((out / "pids.json").read_text())
    except (OSError, ValueError):
        return {}


KINDS = ("workers", "orchestrator", "reducers", "preprocessor", "nats")


def kind_of(name: str) -> str:
    """The kind of process a pids.json name is: worker-2 -> workers, reducer-1 -> reducers."""
    base = name.rstrip("0123456789").rstrip("-_")
    return {"worker": "workers", "reducer": "reducers"}.get(base, base)


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind), "") if kind in KINDS else (len(KINDS), kind)


@dataclass
class Mark:
    """The moment a round-done event arrived, and what had happened by then."""

    at: float
    seconds: float  # the orchestrator's own round time (metrics.json round_seconds)
    cpu: dict[str, float]  # CPU seconds so far by kind of process (KINDS)
    msgs: tuple[int, int]  # messages into and out of the nats-server so far (its /varz)


@dataclass
class RunResult:
    round_s: float = math.nan
    metrics_round_s: float = math.nan
    cpu_s: dict[str, float] = field(default_factory=dict)  # per timed round, by kind of process
    idle_rss: int = 0
    peak_rss: int = 0
    msgs_in: float = math.nan  # messages into the server per timed round (publishes, acks, pulls...)
    msgs_out: float = math.nan  # messages out of it (deliveries, acks, replies...)
    error: str = ""


def _server_msgs(varz: str, wait: float = 0.0) -> tuple[int, int]:
    """(in_msgs, out_msgs) of the server's monitoring endpoint: every message of every client,
    this benchmark's one round event per round included.  `wait`: seconds to wait for the
    endpoint to answer (the server opens it after its client port; a port picked free and not
    yet bound could otherwise be handed to one of the run's roles)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(varz, timeout=5) as answer:
                figures = json.load(answer)
            return figures["in_msgs"], figures["out_msgs"]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def pangea_round(cfg: Config, hidden: tuple[int, ...], dataset: Path, workdir: Path) -> RunResult:
    """Run one `pangea run` on its own nats-server; time its rounds and watch the orchestrator."""
    from pangea.bus import subjects
    from pangea.bus.client import Bus
    from pangea.bus.server import EmbeddedServer, free_port
    from pangea.settings import BusSettings
    from pangea.wire import codec
    from pangea.wire.messages import RoundDone

    job = f"bench-round-{uuid.uuid4().hex[:8]}"
    out = workdir / job
    out.mkdir(parents=True)
    marks: dict[int, Mark] = {}
    with EmbeddedServer(log_file=out / "nats-server.log", monitor_port=free_port()) as server:
        server_pid = server._proc.pid
        varz = f"http://{server.host}:{server.monitor_port}/varz"
        _server_msgs(varz, wait=10.0)  # bound before `pangea run` picks free ports for its roles

        async def on_round(raw: bytes) -> None:
            try:
                event = codec.decode(raw, RoundDone)
            except codec.CodecError:
                return
            if event.round in marks:  # a restarted orchestrator repeats rounds: keep the first
                return
            cpu = dict.fromkeys(KINDS, 0.0)
            for name, pid in _pids(out).items():
                cpu[kind_of(name)] = cpu.get(kind_of(name), 0.0) + _cpu_seconds(pid)
            cpu["nats"] = _cpu_seconds(server_pid)
            marks[event.round] = Mark(time.perf_counter(), event.seconds, cpu, _server_msgs(varz))

        bus = await Bus.connect(BusSettings(nats_url=server.url, job=job), "bench-round")
        await bus.subscribe_events(subjects.rounds(job), on_round)
        args = [
            "--workers",
            str(cfg.k),
            "--hidden",
            ",".join(map(str, hidden)),
            "--compression",
            cfg.compression,
            "--epochs",
            "1",
            "--batch-size",
            str(BATCH),
            "--dataset",
            str(dataset),
            "--device",
            "cpu",
            "--nats-url",
            server.url,
            "--job",
            job,
            "--out",
            str(out),
        ]
        if cfg.shards > 1:
            args += ["--shards", str(cfg.shards)]
        with open(out / "supervisor.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pangea", "run", *args],
                cwd=workdir,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            idle, peak, timed_out = await _watch_orchestrator(proc, out, bus, job)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the supervisor stops every role it started
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            await bus.close()
    result = RunResult(idle_rss=idle, peak_rss=peak)
    if timed_out:
        result.error = f"stopped after {RUN_TIMEOUT:.0f}s (logs: {out})"
        return result
    if proc.returncode != 0:
        tail = (out / "supervisor.log").read_text(errors="replace").strip().splitlines()[-3:]
        result.error = f"exit {proc.returncode}: {' / '.join(tail)} (logs: {out})"
        return result
    timed = [r for r in sorted(marks) if r >= 2 and r - 1 in marks]
    if not timed:
        result.error = f"round-done events seen for rounds {sorted(marks)}: too few to time (logs: {out})"
        return result

    def per_round(value) -> float:
        return statistics.median(value(marks[r]) - value(marks[r - 1]) for r in timed)

    result.round_s = per_round(lambda m: m.at)
    result.metrics_round_s = statistics.median(marks[r].seconds for r in timed)
    kinds = {k for m in marks.values() for k in m.cpu}
    result.cpu_s = {k: per_round(lambda m, k=k: m.cpu.get(k, 0.0)) for k in sorted(kinds, key=_kind_order)}
    result.msgs_in, result.msgs_out = per_round(lambda m: m.msgs[0]), per_round(lambda m: m.msgs[1])
    shutil.rmtree(out, ignore_errors=True)  # params.npz alone is 4P bytes
    return result


async def _watch_orchestrator(proc: subprocess.Popen, out: Path, bus, job: str) -> tuple[int, int, bool]:
    """Sample the orchestrator's memory until `pangea run` ends or times out:
    (idle RSS, VmHWM) in bytes, and whether it timed out.

    Idle is the lowest RSS sampled from the job spec's appearance on the bus (the orchestrator
    has built its model and streams) until its log says it starts round 0: before that it
    broadcasts the first parameters and waits for workers.  The lowest, because one sample
    landed before that broadcast and another during it (a first sample in the race gave
    2.4x or 3.1x the model for the same code): the strictest at-rest figure."""
    from pangea.bus import subjects

    deadline = time.monotonic() + RUN_TIMEOUT
    log = out / "logs" / "orchestrator.log"
    pid = idle = peak = 0
    resting = True  # until round 0 starts
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return idle, peak, True
        pid = pid or _pids(out).get("orchestrator", 0)
        if pid and resting and (idle or await bus.kv_get(subjects.job_bucket(job), "spec") is not None):
            rss = _status(pid).get("VmRSS", 0)
            idle = min(idle, rss) if idle else rss
            resting = not (log.exists() and "starting at round 0" in log.read_text(errors="replace"))
        if pid:
            peak = max(peak, _status(pid).get("VmHWM", 0))
        await asyncio.sleep(SAMPLE_SECONDS)
    return idle, peak, False


def memory_needed(k: int, p: int, rounds: int) -> int:
    """A generous guess of the bytes one run takes: every process holds a few model copies,
    and (pycapnp 2.2.4) every payload a role decodes stays allocated until it exits."""
    return 4 * p * (2 * k + 2) * (rounds + 2)


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- the matrix


def default_matrix(shards: bool) -> list[Config]:
    big = 25_000_000
    configs = [Config(4, big, mode) for mode in ("none", "fp16", "bf16", "int8", "topk")]
    configs += [Config(2, big), Config(8, big)]
    if shards:
        configs.append(Config(4, big, "none", 2))
    configs.append(Config(4, 1_000_000))  # a small model: the fixed cost of a round
    return configs


def quick_matrix() -> list[Config]:
    """One small run (compression and error feedback on the way): a smoke test, not a figure."""
    return [Config(2, 100_000, "int8")]


def run(configs: list[Config] | None = None, rounds: int = 5, gloo_iters: int = 5, quick: bool = False) -> list[dict]:
    """One row per configuration (see the module docstring for the columns)."""
    has_shards = shards_supported()
    if configs is None:
        configs = quick_matrix() if quick else default_matrix(has_shards)
    if not has_shards and any(c.shards > 1 for c in configs):
        print("skipping S > 1: `pangea run --help` of this tree lists no --shards", flush=True)
        configs = [c for c in configs if c.shards == 1]
    rows, gloo, compute = [], {}, {}
    workdir = Path(tempfile.mkdtemp(prefix="pangea-bench-round-"))
    failed = False
    try:
        dataset = workdir / "digits-cut.npz"
        write_dataset(dataset, rounds)
        for cfg in configs:
            hidden = hidden_for(cfg.params)
            p = numel(hidden)
            name = f"K={cfg.k} P={p:,} {cfg.compression} S={cfg.shards}"
            need, have = memory_needed(cfg.k, p, rounds), memory_available()
            if need > have:
                print(
                    f"{name}: skipped, it may need {need / 1e9:.1f} GB and {have / 1e9:.1f} GB are available",
                    flush=True,
                )
                continue
            if (cfg.k, p) not in gloo:
                gloo[cfg.k, p] = gloo_allreduce_seconds(cfg.k, p, gloo_iters)
                compute[cfg.k, p] = compute_seconds(cfg.k, hidden)
            started = time.perf_counter()
            result = asyncio.run(pangea_round(cfg, hidden, dataset, workdir))
            if result.error:
                failed = True
                print(f"{name}: pangea run failed: {result.error}", flush=True)
            over = (result.peak_rss - result.idle_rss) / (4 * p) if result.idle_rss and result.peak_rss else math.nan
            rows.append(
                {
                    "K": cfg.k,
                    "P": p,
                    "compression": cfg.compression,
                    "S": cfg.shards,
                    "pangea_round_s": result.round_s,
                    "metrics_round_s": result.metrics_round_s,
                    "compute_s": compute[cfg.k, p],
                    "gloo_allreduce_s": gloo[cfg.k, p],
                    "pangea / gloo": result.round_s / gloo[cfg.k, p],
                    **{f"cpu_{k}_s": result.cpu_s.get(k, math.nan) for k in KINDS},
                    "all_cpu_s": sum(result.cpu_s.values()) if result.cpu_s else math.nan,
                    "peak_rss_over_model": over,
                    "idle_mb": result.idle_rss / 1e6,
                    "peak_mb": result.peak_rss / 1e6,
                    "msgs_in": result.msgs_in,
                    "msgs_out": result.msgs_out,
                }
            )
            print(
                f"{name}: round {result.round_s:.3g}s, gloo {gloo[cfg.k, p]:.3g}s, "
                f"peak RSS {over:.3g}x; CPU-s per round: "
                + ", ".join(f"{k} {v:.3g}" for k, v in result.cpu_s.items())
                + f"; messages per round at the server: {result.msgs_in:.0f} in, {result.msgs_out:.0f} out"
                + f" ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    finally:
        if failed:
            print(f"logs of the failed runs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def show(rows: list[dict]) -> None:
    """Print rows as benchmarks.common.record does, without writing a results file."""
    keys = list(rows[0]) if rows else []
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def goals(rows: list[dict]) -> list[str]:
    """The performance issue's goals for these rows, as measured (nothing where a row is missing)."""

    def find(k: int, compression: str, shards: int = 1) -> dict | None:
        big = [r for r in rows if r["K"] == k and r["compression"] == compression and r["S"] == shards]
        return max(big, key=lambda r: r["P"]) if big else None

    lines = []
    for k, mode, what, key, target in (
        (4, "none", "round, fp32, S=1 / gloo all_reduce", "pangea / gloo", 5),
        (4, "int8", "round, int8 + error feedback / gloo fp32", "pangea / gloo", 2),
        (8, "none", "orchestrator peak RSS above idle / model bytes", "peak_rss_over_model", 3),
    ):
        row = find(k, mode)
        if row:
            lines.append(f"K={k} P={row['P']:,} {what}: {row[key]:.3g}x (goal <= {target}x)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.round", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny run (K=2, 100k parameters, int8): a smoke test")
    parser.add_argument("--k", help="worker counts, e.g. 2,4,8 (with --params: a custom matrix)")
    parser.add_argument("--params", help="parameter counts, e.g. 1e6,25e6")
    parser.add_argument("--compression", default="none", help="modes for a custom matrix, e.g. none,int8")
    parser.add_argument("--shards", default="1", help="orchestrator shards for a custom matrix, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run; the first two are not timed (default 5)")
    parser.add_argument("--gloo-iters", type=int, default=5, help="timed all_reduce calls per K and P (default 5)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting of every run, e.g. storage=memory"
    )
    args = parser.parse_args()
    for item in args.set:
        name, _, value = item.partition("=")
        EXTRA_ENV[f"PANGEA_{name.strip().upper()}"] = value.strip()
    configs = None
    if args.k or args.params:
        ks = [int(v) for v in (args.k or "4").split(",")]
        ps = [int(float(v)) for v in (args.params or "25e6").split(",")]
        configs = [
            Config(k, p, m, s)
            for k in ks
            for p in ps
            for m in args.compression.split(",")
            for s in (int(v) for v in args.shards.split(","))
        ]
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the first two rounds are not timed")
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    start = time.perf_counter()
    rows = run(configs, rounds=args.rounds, gloo_iters=args.gloo_iters, quick=args.quick)
    if args.quick or configs:
        show(rows)  # benchmarks/results keeps the default matrix only
    else:
        record("round", rows)
    for line in goals(rows):
        print(line)
    print(f"{time.perf_counter() - start:.0f}s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
