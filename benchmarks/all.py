"""Run every benchmark and write benchmarks/results/RESULTS.md (+ one JSON per benchmark).

    python -m benchmarks.all            # about 50 minutes on 2 cores, 32 of them the lab's (root)
    python -m benchmarks.all codec pipe # a subset

README.md's Benchmarks section is RESULTS.md as this writes it.
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks import codec, data, goodput, lab, latency, pipe, tokens, train
from benchmarks import round as round_  # the module, not the builtin
from benchmarks.common import RESULTS, machine, record

BENCHMARKS = {
    "codec": (codec.run, "Cap'n Proto encode/decode of a parameter chunk vs numpy memcpy and pickle"),
    "pipe": (
        pipe.run,
        "transport: Pangea's acknowledged JetStream path vs the nats-py core publish->subscribe ceiling",
    ),
    "round": (
        round_.run,
        "one aggregation round of `pangea run` (K workers, P parameters) vs torch.distributed gloo all_reduce",
    ),
    "latency": (
        latency.run,
        "the floor of a round: `pangea run`'s round on a tiny model vs two bare JetStream publish -> pull-fetch hops",
    ),
    "train": (
        train.run,
        "time and gradient bytes to 0.97 test accuracy on digits, Pangea vs torch DDP (gloo), same K and batches",
    ),
    "tokens": (
        tokens.run,
        "language-model tokens/s of `pangea run` vs torch DDP (gloo), same K, batches and initial weights",
    ),
    "data": (
        data.run,
        "images/s of the preprocessor's data path (decode, random crop and flip) vs a torch DataLoader with as many workers",
    ),
    "goodput": (
        goodput.run,
        "time to target with a worker SIGKILLed every 15 s: `pangea run` vs torchrun --max-restarts (restart-all from checkpoints)",
    ),
    "lab": (
        lab.run,
        "time to target and bytes per link on rate-limited links (network namespaces), Pangea vs torch DDP (gloo) on the same hosts",
    ),
}


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))  # the lab's two workloads differ
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = (row.get(k, "") for k in keys)
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def _goals(name: str, rows: list[dict]) -> list[str]:
    if name == "round":
        return round_.goals(rows)
    if name == "train":
        return [train.goal_line(rows)]
    if name == "tokens":
        return [tokens.goal_line(rows)]
    if name == "goodput":
        return [goodput.goal_line(rows)]
    if name == "latency":
        return [latency.goal_line(rows)]
    if name == "lab":
        return lab.notes(rows)
    if name == "data":
        return [data.goal_line(rows)]
    return []


def main(names: list[str]) -> None:
    sections = []
    started, load = time.perf_counter(), os.getloadavg()[0]
    for name in names or list(BENCHMARKS):
        run, what = BENCHMARKS[name]
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rows = run()
        record(name, rows)
        goals = "".join(f"- {line}\n" for line in _goals(name, rows))
        table = _table(rows) if rows else "(no rows)"
        sections.append(f"#### {name}: {what}\n\n{table}\n\n{goals}_{time.perf_counter() - t0:.0f} s_\n")
    header = (
        f"Machine: {machine()}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"{time.perf_counter() - started:.0f} s in all.\n\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "RESULTS.md").write_text(header + "\n".join(sections))
    print(f"wrote {RESULTS / 'RESULTS.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
