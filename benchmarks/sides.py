"""How the loopback benchmarks start each side of a comparison: `pangea run` from a settings
dict, and K torch DDP ranks of benchmarks/ddp_rank.py (the same computation as Pangea's sync
rounds) on 127.0.0.1.  Both report evaluations as (seconds since the first step, figures)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import log_clock
from benchmarks.lab import Workload

REPO = Path(__file__).resolve().parent.parent


def pangea_command(settings: dict, workers: int, out: Path) -> list[str]:
    """`pangea run` with the settings as flags (`batch_size` -> `--batch-size 32`)."""
    flags = [item for key, value in settings.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return [sys.executable, "-m", "pangea", "run", *flags, "--workers", str(workers), "--out", str(out)]


def pangea_env() -> dict[str, str]:
    """This environment without a job's PANGEA_* (the embedded server), and a text log to read the clock from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    env["PANGEA_LOG_FORMAT"] = "text"
    return env


def pangea_evaluations(out: Path) -> list[tuple[float, dict]]:
    """The orchestrator log's evaluations: seconds since "starting at round 0", figures with `round`."""
    log = out / "logs" / "orchestrator.log"
    return log_clock(log.read_text(errors="replace")) if log.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_config(workload: Workload, workers: int, workdir: Path, *, torchrun: bool = False, **extra) -> Path:
    """The CONFIG.json of benchmarks/ddp_rank.py for K ranks on loopback; each rank gets
    cpu_count // K torch threads, as `pangea run` gives its workers.  Under torchrun the
    rendezvous comes from its environment."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "train": workload.train,
        "world": workers,
        "ifname": "lo",
        "threads": max(1, (os.cpu_count() or 1) // workers),
        "out": str(workdir / "ddp.json"),
        "target": {"figure": workload.figure, "value": workload.target, "higher": workload.higher},
        **({} if torchrun else {"master": "127.0.0.1", "port": free_port()}),
        **extra,
    }
    path = workdir / "ddp-config.json"
    path.write_text(json.dumps(config))
    return path


def ddp_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ddp_evaluations(workdir: Path) -> list[tuple[float, dict]]:
    """Rank 0's evaluations ([] when it wrote none)."""
    out = workdir / "ddp.json"
    return [(s, f) for s, f in json.loads(out.read_text())["evaluations"]] if out.exists() else []


def run_ddp_ranks(config: Path, workers: int, timeout: float, *, poll: float = 0.2) -> str:
    """Start K ranks as fresh processes (never forked from a process torch has started threads
    in) and wait for them; "" or a one-line reason they failed.

    `timeout` is a deadline for the whole run, not for each rank; the first rank that exits
    with an error ends the run at once (the others would wait in gloo for its timeout).
    Every rank still running at the end is killed, so no row can hang the table.
    """
    logs = [open(config.parent / f"rank{i}.log", "w") for i in range(workers)]  # noqa: SIM115 - closed below
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ddp_rank", str(config), str(i)],
            env=ddp_env(),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for i, log in enumerate(logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [rank.poll() for rank in ranks]
            failed = [i for i, code in enumerate(codes) if code]
            if failed:
                tail = (config.parent / f"rank{failed[0]}.log").read_text(errors="replace").strip().splitlines()[-1:]
                return f"rank {failed[0]} exited {codes[failed[0]]}: {' '.join(tail)}"
            if all(code == 0 for code in codes):
                return ""
            if time.monotonic() > deadline:
                waiting = [i for i, code in enumerate(codes) if code is None]
                return f"stopped after {timeout:.0f} s: rank {', '.join(map(str, waiting))} had not finished"
            time.sleep(poll)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
        for log in logs:
            log.close()
