"""A job's checkpoints in its Object Store bucket: `latest` (what a restarted orchestrator resumes
from) and `round-<n>` (the last few, for replays from a round).  The names are parsed here only."""

from __future__ import annotations

import asyncio
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
        self._saving: asyncio.Task | None = None  # the checkpoints being stored, in order

    def save_later(self, ckpt: Checkpoint) -> None:
        """Serialise `ckpt` now and store it in the background, after any checkpoint still being
        stored; `saved` waits for it (a failure to store raises there, or at the next `save_later`).

        Serialised into a temporary file and streamed from it: the orchestrator's memory holds
        no serialised copy (that copy was its peak: parameters and optimizer state again).  It is
        serialised before this returns, so its metrics may be the live ones (not a copy)."""
        previous = self._saving
        if previous is not None and previous.done():
            previous.result()  # the last store failed: say so now, not at the end of the run
            previous = None
        file = _serialised(ckpt)

        async def store() -> None:
            with file:
                if previous is not None:
                    await previous
                await self._store(file, ckpt.round)

        self._saving = asyncio.create_task(store())
        # Retrieved here too: a role that stops for another reason before the next checkpoint
        # would otherwise print "Task exception was never retrieved" with a traceback.
        self._saving.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def saved(self) -> None:
        """Wait until the checkpoints given to `save_later` are stored."""
        if self._saving is not None:
            task, self._saving = self._saving, None
            await task

    async def save(self, ckpt: Checkpoint) -> None:
        """Store `ckpt` (and any checkpoint still being stored) before returning."""
        self.save_later(ckpt)
        await self.saved()

    async def _store(self, file: BinaryIO, round_: int) -> None:
        """Store as the latest and as `round-<n>`; keep only the last `keep` of those."""
        bucket = subjects.checkpoint_bucket(self.job)
        await self.bus.put_object(bucket, LATEST, file)
        await self.bus.put_object(bucket, f"{_ROUND}{round_}", file)
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
