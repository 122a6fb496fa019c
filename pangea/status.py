"""`pangea status`: what a person or an autoscaler needs to know about a running job."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.table import Table

from pangea import codec
from pangea.bus import subjects
from pangea.bus.client import Bus, BusError
from pangea.messages import Heartbeat, JobSpec, RoundDone


async def job_status(bus: Bus) -> dict:
    """Spec, progress, recent round times and every member with its batch backlog."""
    raw_spec = await bus.kv_get(subjects.job_bucket(bus.job), "spec")
    if raw_spec is None:
        raise BusError(f"no job {bus.job!r} on this server")
    spec = codec.decode(raw_spec, JobSpec)
    raw_round = await bus.kv_get(subjects.job_bucket(bus.job), "round")
    last = codec.decode(raw_round, RoundDone) if raw_round else None
    members = []
    now = time.time()
    for worker, raw in sorted((await bus.kv_items(subjects.members_bucket(bus.job))).items()):
        try:
            beat = codec.decode(raw, Heartbeat)
        except codec.CodecError:
            continue
        backlog = await bus.consumer_backlog("batches", subjects.worker_consumer(worker))
        members.append({
            "id": worker, "host": beat.host, "pid": beat.pid,
            "heartbeat_age_seconds": round(now - beat.sent_at, 2), "shards_done": beat.shards_done,
            "params_version": beat.params_version,
            "backlog": backlog[0] if backlog else None, "unacked": backlog[1] if backlog else None,
        })
    recent = list(last.recent_seconds) if last else []
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
        "members": members,
    }


def print_status(status: dict, console: Console) -> None:
    done, total = status["rounds_done"], status["total_rounds"]
    recent = status["recent_round_seconds"]
    mean = sum(recent) / len(recent) if recent else math.nan
    state = "finished" if status["finished"] else "running"
    console.print(
        f"job [cyan]{status['job']}[/] ({status['model']} on {status['dataset']}): {state}, "
        f"round {done}/{total}, recent rounds {mean:.3f}s on average"
        + (f", replaying {status['source_job']}" if status["source_job"] else "")
    )
    table = Table("worker", "host", "pid", "last heartbeat", "shards done", "params", "backlog", "unacked")
    for m in status["members"]:
        table.add_row(
            m["id"], m["host"], str(m["pid"]), f"{m['heartbeat_age_seconds']:.1f}s ago", str(m["shards_done"]),
            str(m["params_version"]), str(m["backlog"]), str(m["unacked"]),
        )
    console.print(table if status["members"] else "no live workers")
