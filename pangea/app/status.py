"""`pangea status`: what a person or an autoscaler needs to know about a running job."""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.table import Table

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.errors import JobError
from pangea.wire import codec
from pangea.wire.messages import Heartbeat, JobSpec, RoundDone


async def job_status(bus: Bus) -> dict:
    """Spec, progress, recent round times and every member with its state and batch backlog.

    A member's state is the orchestrator's: `ok` (planned), `starting` (no parameters yet),
    `overdue` (its heartbeats stopped) or `quarantined: <why>` (it missed a deadline)."""
    raw_spec = await bus.kv_get(subjects.job_bucket(bus.job), subjects.JobKey.SPEC)
    if raw_spec is None:
        raise JobError(f"no job {bus.job!r} on this server")
    spec = codec.decode(raw_spec, JobSpec)
    raw_round = await bus.kv_get(subjects.job_bucket(bus.job), subjects.JobKey.ROUND)
    last = codec.decode(raw_round, RoundDone) if raw_round else None
    members = []
    now = time.time()
    # The orchestrator's view, as of the last round: who it does not plan, and why.
    excluded = dict(zip(last.excluded_workers, last.excluded_reasons)) if last else {}
    for worker, raw in sorted((await bus.kv_items(subjects.members_bucket(bus.job))).items()):
        try:
            beat = codec.decode(raw, Heartbeat)
        except codec.CodecError:
            continue
        backlog = await bus.consumer_backlog("batches", subjects.worker_consumer(worker))
        members.append(
            {
                "id": worker,
                "host": beat.host,
                "pid": beat.pid,
                "heartbeat_age_seconds": round(now - beat.sent_at, 2),
                "shards_done": beat.shards_done,
                "params_version": beat.params_version,
                "state": excluded.get(worker, "ok" if beat.ready else "starting"),
                "backlog": backlog[0] if backlog else None,
                "unacked": backlog[1] if backlog else None,
            }
        )
    raw_desired = await bus.kv_get(subjects.job_bucket(bus.job), subjects.JobKey.DESIRED)
    desired = json.loads(raw_desired) if raw_desired else {"desired": None, "why": "no signal yet"}
    recent = list(last.recent_seconds) if last else []
    # Throughput of the last rounds: samples (tokens for lm) per second of round time.
    per_round = (last.num_samples * max(1, last.targets_per_sample)) if last else 0
    rate = per_round / (sum(recent) / len(recent)) if recent and sum(recent) > 0 else None
    unit = "tokens_per_second" if last and last.targets_per_sample > 1 else "samples_per_second"
    return {
        "job": bus.job,
        "model": spec.model,
        "dataset": spec.dataset,
        "source_job": spec.source_job or None,
        "rounds_done": last.round + 1 if last else 0,
        "total_rounds": spec.total_rounds,
        "finished": bool(last and last.round + 1 == spec.total_rounds),
        "last_loss": last.loss if last else None,
        "recent_round_seconds": [round(x, 4) for x in recent],
        unit: round(rate, 1) if rate else None,
        "members": members,
        "workers": {"desired": desired["desired"], "present": len(members), "why": desired["why"]},
    }


def print_status(status: dict, console: Console) -> None:
    done, total = status["rounds_done"], status["total_rounds"]
    recent = status["recent_round_seconds"]
    mean = sum(recent) / len(recent) if recent else math.nan
    state = "finished" if status["finished"] else "running"
    console.print(
        f"job [cyan]{status['job']}[/] ({status['model']} on {status['dataset']}): {state}, "
        f"round {done}/{total}, recent rounds {mean:.3f}s on average"
        + "".join(
            f", {status[k]:,.0f} {k.split('_')[0]}/s"
            for k in ("tokens_per_second", "samples_per_second")
            if status.get(k)
        )
        + (f", replaying {status['source_job']}" if status["source_job"] else "")
    )
    table = Table("worker", "state", "host", "pid", "last heartbeat", "shards done", "params", "backlog", "unacked")
    for m in status["members"]:
        table.add_row(
            m["id"],
            m["state"],
            m["host"],
            str(m["pid"]),
            f"{m['heartbeat_age_seconds']:.1f}s ago",
            str(m["shards_done"]),
            str(m["params_version"]),
            str(m["backlog"]),
            str(m["unacked"]),
        )
    console.print(table if status["members"] else "no live workers")
    workers = status["workers"]
    console.print(f"workers: {workers['present']} present, {workers['desired']} desired ({workers['why']})")
