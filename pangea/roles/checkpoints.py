"""A job's checkpoints in its Object Store bucket: `latest` (what a restarted orchestrator resumes
from) and `round-<n>` (the last few, for replays from a round).  The names are parsed here only."""

from __future__ import annotations

import io
import logging
import tempfile
from typing import BinaryIO

from pangea.bus import subjects
from pangea.errors import JobError
from pangea.train.checkpoint import Checkpoint

log = logging.getLogger(__name__)

LATEST = "latest"
_ROUND = "round-"


def stored_rounds(names: list[str]) -> list[int]:
    """The rounds of the `round-<n>` checkpoints among an Object Store bucket's names, in order."""
    return sorted(int(name[len(_ROUND) :]) for name in names if name.startswith(_ROUND))


def _serialised(ckpt: Checkpoint) -> BinaryIO:
    """`ckpt` in a temporary file; in memory when no temporary file can be written (a read-only or
    full $TMPDIR): a checkpoint is never skipped for want of local disk."""
    file = None
    try:
        file = tempfile.TemporaryFile(prefix="pangea-checkpoint-")
        ckpt.write(file)
        return file
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        if file is not None:
            file.close()
        log.warning("checkpoint of round %d serialised in memory: no temporary file (%s)", ckpt.round, exc)
        buffer = io.BytesIO()
        ckpt.write(buffer)
        return buffer


class CheckpointStore:
    """Saving, pruning and finding the checkpoints of `job` (and reading another job's, for replays)."""

    def __init__(self, bus, job: str, keep: int) -> None:
        self.bus, self.job, self.keep = bus, job, keep

    async def save(self, ckpt: Checkpoint) -> None:
        """Store `ckpt` as the latest and as `round-<n>`; keep only the last `keep` of those.

        Serialised into a temporary file and streamed from it: the orchestrator's memory holds
        no serialised copy (that copy was its peak: parameters and optimizer state again).  It is
        serialised before the first await, so its metrics may be the live ones (not a copy)."""
        bucket = subjects.checkpoint_bucket(self.job)
        with _serialised(ckpt) as file:
            await self.bus.put_object(bucket, LATEST, file)
            await self.bus.put_object(bucket, f"{_ROUND}{ckpt.round}", file)
        kept = stored_rounds(await self.bus.list_objects(bucket))
        for old in kept[: max(0, len(kept) - self.keep)]:
            await self.bus.delete_object(bucket, f"{_ROUND}{old}")

    async def latest(self) -> Checkpoint | None:
        raw = await self.bus.get_object(subjects.checkpoint_bucket(self.job), LATEST)
        return Checkpoint.from_bytes(raw) if raw is not None else None

    async def at_or_before(self, job: str, round_: int) -> Checkpoint:
        """`job`'s latest kept checkpoint at or before `round_`; a one-line JobError if there is none."""
        bucket = subjects.checkpoint_bucket(job)
        stored = stored_rounds(await self.bus.list_objects(bucket))
        usable = [k for k in stored if k <= round_]
        if not usable:
            raise JobError(
                f"job {job!r} has no checkpoint at or before round {round_} (it keeps rounds {stored or 'none'})"
            )
        return Checkpoint.from_bytes(await self.bus.get_object(bucket, f"{_ROUND}{usable[-1]}"))
