"""WAN benchmark on real links: time to target and bytes per link, torch DDP (gloo) against
Pangea sync, diloco (H=20) and int8, with every worker on its own host behind a rate-limited link.

    python -m benchmarks.lab                      # the table (see RESULTS below for how long)
    python -m benchmarks.lab --quick              # small MLP, 1 epoch, target 0.5, 1gbit: plumbing only
    python -m benchmarks.lab --only "lm"          # just the rows whose label contains "lm"
    python -m benchmarks.lab --links 50mbit       # just one link speed

The deployment (tests/netlab): K = 4 worker hosts, each behind its own link of the row's rate
(a `tbf` qdisc on both ends: the kernel limits every TCP byte, gloo's as much as NATS's), and a
hub host with no limit (a data centre) running nats-server, the orchestrator and the
preprocessor.  The DDP rows run K gloo ranks on the same K worker hosts, over the same links
(rank 0's host is the rendezvous); the hub host is idle for them.  No latency is added: this
kernel has no netem, and the links are as short as a bridge makes them; only bandwidth differs
from loopback.

What is measured, the same on both sides:
- **time to target**: from the first step, once every process is up (start-up excluded), to the
  end of the first evaluation that meets the target.  Pangea's clock is its orchestrator log
  ("starting at round 0" to the evaluation line, millisecond timestamps); DDP's is rank 0's
  perf_counter from the barrier before step 0.  Both evaluate at the same global steps (each
  epoch's end, and every `eval_every` steps); a diloco round evaluates once, after its H steps.
- **bytes per link**: the kernel's counters of each link (`ip -s link`, Ethernet headers
  included), read before the roles start and when the target is met (Pangea: the moment the
  benchmark reads the evaluation line in the log, polled every 0.2 s; DDP: after its ranks exit,
  which they do at the target).  So Pangea's count includes the batches the preprocessor ships
  to the workers, the parameter broadcasts and the protocol's own messages; DDP's its
  initial parameter broadcast and the ring all-reduces.  Each run stops at its target.

Every process of a row gets one torch thread (PANGEA_TORCH_THREADS=1, and DDP's ranks the same),
on a 2-core machine shared by all of them: at 1 Gbit/s the rows are bound by CPU, at 50 Mbit/s by
the links.  `PANGEA_NET_DELAY` (a sleep before each publish) is a model and is not used here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import log_clock, record

K = 4
LINKS = ("1gbit", "50mbit")
POLL = 0.2  # seconds between two looks at the orchestrator's log
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """What is trained (TrainSettings fields, the same on every side) and the target to reach."""

    name: str
    train: dict
    figure: str  # the evaluation figure the target is on
    target: float
    higher: bool  # whether the target is a floor (accuracy) or a ceiling (loss)
    timeout: float  # seconds a row may train before it is marked "not reached"

    def met(self, figures: dict) -> bool:
        value = figures.get(self.figure)
        return value is not None and (value >= self.target if self.higher else value <= self.target)


@dataclass(frozen=True)
class Side:
    name: str
    settings: dict = field(default_factory=dict)  # Pangea's settings beyond the workload's (None: DDP)
    ddp: bool = False


# The 3.02M-parameter MLP of benchmarks/train.py (Adam 0.002: 0.97 at epoch 4 in plain torch),
# with room for the modes to take longer: each run stops at its target.
MLP = Workload(
    "mlp 3M",
    dict(
        task="classify",
        dataset="digits",
        model="mlp",
        hidden="2048,1400",
        optimizer="adam",
        lr=0.002,
        batch_size=64,
        epochs=10,
        seed=0,
    ),
    figure="test_accuracy",
    target=0.97,
    higher=True,
    timeout=1200,
)
# README's language model (byte-level GPT, 0.45M parameters) on the standard library's source;
# 3.0 bits/byte is about two thirds of the way from the start (4.5) to where 600 steps end (2.37).
LM = Workload(
    "lm gpt 0.45M",
    dict(
        task="lm",
        dataset="{corpus}",
        model="gpt",
        optimizer="adamw",
        lr=0.003,
        lr_schedule="cosine",
        warmup_steps=50,
        clip_grad=1.0,
        batch_size=32,
        max_steps=400,
        eval_every=25,
        seed=0,
    ),
    figure="bits_per_byte",
    target=3.0,
    higher=False,
    timeout=1200,
)
SIDES = (
    Side("ddp", ddp=True),
    Side("sync"),
    Side("diloco H=20", dict(mode="diloco", local_steps=20)),
    Side("int8", dict(compression="int8")),
)
QUICK = Workload(
    "mlp 128 (quick)",
    dict(
        task="classify",
        dataset="digits",
        model="mlp",
        hidden="128",
        lr=0.15,
        optimizer="sgd",
        batch_size=64,
        epochs=1,
        seed=0,
    ),
    figure="test_accuracy",
    target=0.5,
    higher=True,
    timeout=300,
)


@dataclass
class Outcome:
    """One side's run: each evaluation as (seconds, figures), and the bytes of each link."""

    evaluations: list[tuple[float, dict]]
    traffic: dict  # link name -> Traffic over the run
    note: str = ""

    def first(self, workload: Workload) -> tuple[float, dict] | None:
        return next(((s, f) for s, f in self.evaluations if workload.met(f)), None)


# ---------------------------------------------------------------- Pangea on the lab


def pangea_row(workload: Workload, side: Side, rate: str, workdir: Path) -> Outcome:
    """Train the workload as a Pangea job on the lab; stop it at the target."""
    from tests.netlab import Lab
    from tests.netlab import nats as labnats
    from tests.netlab.roles import Job

    with Lab(workdir) as lab:
        hub = lab.host("hub")
        hosts = [lab.host(f"w{i}", rate=rate) for i in range(K)]
        server = labnats.hub(hub).start()
        job = Job(f"bench-{uuid.uuid4().hex[:8]}", server.url, torch_threads=1, **pangea_settings(workload, side))
        for i, host in enumerate(hosts):
            job.worker(host, f"w{i}")
        job.preprocessor(hub)
        before = lab.traffic()
        orchestrator = job.orchestrator(hub, "--workers", str(K), "--out", str(workdir / "run"))
        deadline, evaluations, note = time.monotonic() + workload.timeout, [], ""
        while True:
            evaluations = log_clock(orchestrator.log())
            if any(workload.met(f) for _, f in evaluations):
                break
            if not orchestrator.alive:
                note = (
                    "" if orchestrator.popen.returncode == 0 else f"orchestrator exited {orchestrator.popen.returncode}"
                )
                break
            if time.monotonic() > deadline:
                note = f"stopped after {workload.timeout:.0f} s"
                break
            time.sleep(POLL)
        after = lab.traffic()
    return Outcome(evaluations, {name: after[name] - before[name] for name in after}, note)


def pangea_settings(workload: Workload, side: Side) -> dict:
    """The job's settings: the workload's, then the side's.  Diloco's inner AdamW runs at the
    workload's learning rate (Pangea's default inner lr is 1e-3), and its outer steps get no
    warmup: a warmup counted in optimizer steps would span 20x as many global batches there."""
    settings = {**workload.train, **side.settings}
    if side.settings.get("mode") == "diloco":
        settings["inner_lr"] = side.settings.get("inner_lr", workload.train["lr"])
        settings["warmup_steps"] = 0
    return settings


# ---------------------------------------------------------------- DDP on the lab


def ddp_row(workload: Workload, rate: str, workdir: Path) -> Outcome:
    """Train the workload with K gloo ranks on the K worker hosts; they stop at the target."""
    from tests.netlab import Lab

    with Lab(workdir) as lab:
        lab.host("hub")  # the same wiring as Pangea's rows; idle here
        hosts = [lab.host(f"w{i}", rate=rate) for i in range(K)]
        out = workdir / "ddp.json"
        config = workdir / "ddp-config.json"
        config.write_text(
            json.dumps(
                {
                    "train": workload.train,
                    "world": K,
                    "master": hosts[0].address,
                    "port": 29500,
                    "ifname": hosts[0].ifname,
                    "threads": 1,
                    "out": str(out),
                    "target": {"figure": workload.figure, "value": workload.target, "higher": workload.higher},
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
        env["PYTHONUNBUFFERED"] = "1"
        before = lab.traffic()
        ranks = [
            host.spawn(f"rank{i}", [sys.executable, "-m", "benchmarks.ddp_rank", str(config), str(i)], env, cwd=REPO)
            for i, host in enumerate(hosts)
        ]
        deadline, note = time.monotonic() + workload.timeout, ""
        while any(r.alive for r in ranks) and time.monotonic() < deadline:
            time.sleep(POLL)
        if any(r.alive for r in ranks):
            note = f"stopped after {workload.timeout:.0f} s"
        elif any(r.popen.returncode for r in ranks):
            failed = next(r for r in ranks if r.popen.returncode)
            note = f"{failed.name} exited {failed.popen.returncode}: {failed.log().strip().splitlines()[-1:]}"
        after = lab.traffic()
    evaluations = [(s, f) for s, f in json.loads(out.read_text())["evaluations"]] if out.exists() else []
    return Outcome(evaluations, {name: after[name] - before[name] for name in after}, note)


# ---------------------------------------------------------------- the table


def row(workload: Workload, side: Side, rate: str, outcome: Outcome, ddp_seconds: float | None) -> dict:
    hit = outcome.first(workload)
    workers = [t for name, t in outcome.traffic.items() if name.startswith("w")]
    seconds = hit[0] if hit else None
    steps = _steps(hit[1], side) if hit else None
    last = outcome.evaluations[-1][1].get(workload.figure) if outcome.evaluations else None
    return {
        "workload": workload.name,
        "link": rate,
        "side": side.name if side.ddp else f"pangea {side.name}",
        "time to target s": seconds if seconds is not None else (outcome.note or "not reached"),
        "/ ddp time": seconds / ddp_seconds if seconds and ddp_seconds else "n/a",
        "steps to target": steps if steps is not None else "-",
        "MB up per worker link": sum(t.up for t in workers) / len(workers) / 1e6,
        "MB down per worker link": sum(t.down for t in workers) / len(workers) / 1e6,
        "hub link MB": outcome.traffic["hub"].total / 1e6,
        f"{workload.figure} at stop": last if last is not None else "n/a",
    }


def _steps(figures: dict, side: Side) -> int:
    """Global batches trained when the evaluation ran: DDP counts steps, Pangea rounds (H each in diloco)."""
    if side.ddp:
        return int(figures["step"])
    return int(figures["round"]) * int(
        side.settings.get("local_steps", 1) if side.settings.get("mode") == "diloco" else 1
    )


def notes(rows: list[dict]) -> list[str]:
    """Per workload and link speed: which side reaches the target first, and by what ratio."""
    lines = []
    for key in dict.fromkeys((r["workload"], r["link"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["link"]) == key]
        timed = [r for r in group if isinstance(r["time to target s"], float)]
        ddp = next((r for r in group if r["side"] == "ddp"), None)
        if not timed:
            lines.append(f"{key[0]}, {key[1]}: no side reached the target")
            continue
        best = min(timed, key=lambda r: r["time to target s"])
        pangea = [r for r in timed if r["side"] != "ddp"]
        if best is ddp and pangea:
            fastest = min(pangea, key=lambda r: r["time to target s"])
            lines.append(
                f"{key[0]}, {key[1]}: DDP first ({ddp['time to target s']:.1f} s); Pangea's fastest, "
                f"{fastest['side']}, takes {fastest['time to target s'] / ddp['time to target s']:.2f}x as long"
            )
        elif ddp is not None and isinstance(ddp["time to target s"], float):
            lines.append(
                f"{key[0]}, {key[1]}: {best['side']} first ({best['time to target s']:.1f} s), "
                f"{ddp['time to target s'] / best['time to target s']:.2f}x faster than DDP "
                f"({ddp['time to target s']:.1f} s)"
            )
        else:
            lines.append(
                f"{key[0]}, {key[1]}: {best['side']} first ({best['time to target s']:.1f} s); DDP: "
                f"{ddp['time to target s'] if ddp else 'not run'}"
            )
    return lines


def run(
    workloads: list[Workload] | None = None,
    links: tuple[str, ...] = LINKS,
    only: str | None = None,
    sides: tuple[Side, ...] = SIDES,
) -> list[dict]:
    """Every (workload, link, side) row; [] with a printed reason where no lab can be made."""
    from tests.netlab import unavailable

    reason = unavailable()
    if reason:
        print(f"lab benchmark skipped: {reason}")
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="pangea-bench-lab-") as tmp:
        for workload in workloads or [MLP, LM]:
            workload = with_corpus(workload, Path(tmp))
            for rate in links:
                ddp_seconds = None
                for side in sides:
                    label = f"{workload.name} {rate} {side.name}"
                    if only and only not in label:
                        continue
                    print(f"== {label} ...", flush=True)
                    t0 = time.perf_counter()
                    workdir = Path(tmp, re.sub(r"[^a-z0-9]+", "-", label))
                    outcome = (
                        ddp_row(workload, rate, workdir) if side.ddp else pangea_row(workload, side, rate, workdir)
                    )
                    hit = outcome.first(workload)
                    if side.ddp and hit:
                        ddp_seconds = hit[0]
                    print(
                        f"   {time.perf_counter() - t0:.0f} s with start-up; evaluations "
                        f"{[(round(s, 1), round(f.get(workload.figure, float('nan')), 4)) for s, f in outcome.evaluations]}"
                        f"{'; ' + outcome.note if outcome.note else ''}",
                        flush=True,
                    )
                    rows.append(row(workload, side, rate, outcome, ddp_seconds))
    return rows


def with_corpus(workload: Workload, tmp: Path) -> Workload:
    """The LM's corpus: this Python's standard library as one .txt (offline), made once per run."""
    if workload.train.get("dataset") != "{corpus}":
        return workload
    from pangea.train.tokens import stdlib_corpus

    corpus = tmp / "stdlib.txt"
    if not corpus.exists():
        stdlib_corpus(corpus)
    return Workload(**{**workload.__dict__, "train": {**workload.train, "dataset": str(corpus)}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small MLP, 1 epoch, target 0.5, 1gbit, DDP and sync")
    parser.add_argument("--only", help="run only the rows whose label (workload link side) contains this text")
    parser.add_argument("--links", help="comma-separated link rates (default: 1gbit,50mbit)")
    args = parser.parse_args()
    links = tuple(args.links.split(",")) if args.links else (("1gbit",) if args.quick else LINKS)
    load, started = os.getloadavg()[0], time.perf_counter()
    if args.quick:
        rows = run([QUICK], links, args.only, SIDES[:2])
    else:
        rows = run(None, links, args.only)
    print(
        f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - started:.0f} s in all"
    )
    record("lab-quick" if args.quick else "lab", rows)
    for line in notes(rows):
        print(line)


if __name__ == "__main__":
    main()
