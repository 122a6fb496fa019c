"""Names of a job's subjects, streams, consumers and buckets: one place, used by every role.

Job and worker names are restricted to [A-Za-z0-9_-] (see settings.NAME_PATTERN), so they
are valid subject tokens, stream names and bucket names as they are.
"""

from __future__ import annotations

PREFIX = "pangea"


def batches(job: str, worker: str = "*") -> str:
    """Per-worker batch subject; with the default wildcard, all of the job's batch subjects."""
    return f"{PREFIX}.{job}.batches.{worker}"


def grads(job: str, shard: int = 0) -> str:
    """Gradient chunks of slice `shard` of the parameter vector: slice 0 goes to the
    orchestrator, slice s > 0 to orchestrator shard s (`pangea reducer --shard s`)."""
    return f"{PREFIX}.{job}.grads" + (f".{shard}" if shard else "")


def shard_grads(job: str) -> str:
    """Every orchestrator shard's gradient subject (slices 1 and up)."""
    return f"{PREFIX}.{job}.grads.*"


def reduced(job: str) -> str:
    """Orchestrator shards' averaged slices, for the orchestrator."""
    return f"{PREFIX}.{job}.reduced"


def params(job: str) -> str:
    return f"{PREFIX}.{job}.params"


def plans(job: str) -> str:
    return f"{PREFIX}.{job}.plans"


def rounds(job: str) -> str:
    """Core-NATS progress events (RoundDone): for `pangea run`'s progress and status tools."""
    return f"{PREFIX}.{job}.rounds"


def stream(job: str, what: str) -> str:
    """Stream name, e.g. PANGEA_myjob_BATCHES."""
    return f"PANGEA_{job}_{what.upper()}"


def members_bucket(job: str) -> str:
    return f"pangea_{job}_members"


def job_bucket(job: str) -> str:
    """The job's KV bucket; its keys are the JobKey names."""
    return f"pangea_{job}_job"


def job_of_stream(name: str) -> str | None:
    """The job whose bucket a stream backs (JetStream stores bucket B as stream KV_B), or None."""
    if name.startswith("KV_pangea_") and name.endswith("_job"):
        return name[len("KV_pangea_") : -len("_job")] or None
    return None


class JobKey:
    """Keys of the job bucket."""

    SPEC = "spec"  # the JobSpec every role builds from
    GENERATION = "generation"  # the orchestrator generation now running the job
    ROUND = "round"  # the last RoundDone
    FINISHED = "finished"  # set (to the round count) once the job is over
    DESIRED = "desired"  # the autoscaling signal: {"desired": workers, "why": ...}
    PREPROCESSOR = "preprocessor"  # set (to "host:pid") once a preprocessor has its data and reads the plans


def checkpoint_bucket(job: str) -> str:
    return f"pangea_{job}_checkpoint"


def code_bucket(job: str) -> str:
    """The job's Object Store bucket of pickled user code: object `<sha256>` holds `pickle:<sha256>`."""
    return f"pangea_{job}_code"


def worker_consumer(worker: str) -> str:
    return f"worker-{worker}"
