"""A job's streams on the server: created with their limits, purged, found, deleted."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext, api

from pangea.bus import subjects
from pangea.bus.errors import BusError
from pangea.settings import BusSettings

DUPLICATE_WINDOW = 600.0  # seconds in which a resent msg id is stored once


def storage_type(settings: BusSettings, derived: bool = False) -> api.StorageType:
    """Where the server keeps a stream: the replay log and plans by `storage`, gradients and
    parameters (recomputable: lost ones are re-issued) by `derived_storage`."""
    kind = settings.derived_storage if derived else settings.storage
    return api.StorageType.FILE if kind == "file" else api.StorageType.MEMORY


class Streams:
    """The Bus's part that owns the job's stream topology."""

    settings: BusSettings
    job: str
    js: JetStreamContext
    chunk_bytes: int
    _kv_handles: dict  # Store's, dropped with the buckets

    async def ensure_job_streams(self, params_bytes: int) -> None:
        """Create the job's streams (idempotent).  The params stream keeps a few versions."""
        storage, derived = storage_type(self.settings), storage_type(self.settings, derived=True)
        job = self.job
        configs = [
            api.StreamConfig(
                name=subjects.stream(job, "batches"),
                subjects=[subjects.batches(job)],
                storage=storage,
                max_age=self.settings.batch_retention_hours * 3600,
                max_bytes=self.settings.batch_retention_bytes,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
            api.StreamConfig(
                name=subjects.stream(job, "plans"),
                subjects=[subjects.plans(job)],
                storage=storage,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
            api.StreamConfig(
                name=subjects.stream(job, "grads"),
                subjects=[subjects.grads(job), subjects.shard_grads(job), subjects.reduced(job)],
                storage=derived,
                retention=api.RetentionPolicy.WORK_QUEUE,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
            api.StreamConfig(
                name=subjects.stream(job, "params"),
                subjects=[subjects.params(job)],
                storage=derived,
                max_bytes=max(64 << 20, 4 * (params_bytes + (params_bytes // self.chunk_bytes + 1) * 512)),
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
        ]
        for config in configs:
            await self._ensure_stream(config)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                raise BusError(f"cannot create stream {config.name}: {exc.description}") from None

    async def purge_before(self, what: str, sequence: int) -> None:
        """Drop every message of the job's `what` stream below `sequence`."""
        await self.js.purge_stream(subjects.stream(self.job, what), seq=sequence)

    async def job_names(self) -> list[str]:
        """Every job on the server (the jobs whose bucket exists), sorted."""
        jobs = (subjects.job_of_stream(info.config.name) for info in await self.js.streams_info())
        return sorted(job for job in jobs if job)

    async def job_exists(self) -> bool:
        """True if the job's plan stream already holds rounds (a previous run of this job)."""
        try:
            info = await self.js.stream_info(subjects.stream(self.job, "plans"))
        except nats.js.errors.NotFoundError:
            return False
        return info.state.messages > 0

    async def delete_job(self) -> None:
        """Remove every stream and bucket of the job."""
        for what in ("batches", "plans", "grads", "params"):
            try:
                await self.js.delete_stream(subjects.stream(self.job, what))
            except nats.js.errors.NotFoundError:
                pass
        for bucket in (subjects.members_bucket(self.job), subjects.job_bucket(self.job)):
            self._kv_handles.pop(bucket, None)
            try:
                await self.js.delete_key_value(bucket)
            except nats.js.errors.NotFoundError:
                pass
        for bucket in (subjects.checkpoint_bucket(self.job), subjects.code_bucket(self.job)):
            try:
                await self.js.delete_object_store(bucket)
            except nats.js.errors.NotFoundError:
                pass
