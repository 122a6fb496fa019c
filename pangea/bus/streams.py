"""A job's streams on the server: created with their limits, purged, found, deleted."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.errors import BusError
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW = 600.0  # seconds in which a resent msg id is stored once
# JetStream's answers when the server's or the account's storage limit leaves no room:
# 10023 "insufficient resources" (a publish), 10047 "insufficient storage resources available"
# and 10028 "insufficient memory resources available" (a file or memory stream whose max_bytes
# cannot be reserved).
OUT_OF_STORAGE = frozenset({10023, 10028, 10047})
FREES_SPACE = (
    "keep fewer batches (PANGEA_BATCH_RETENTION_ROUNDS or PANGEA_BATCH_RETENTION_BYTES), "
    "delete finished jobs (`pangea delete --job NAME`), or raise the server's max_{kind}_store "
    "(its jetstream block) or the account's limit"
)
ROOM_PAUSE = 1.0  # seconds between tries to store in a full JetStream storage


@dataclass
class _Full:
    """A JetStream storage that refused to store: what to tell the user, and the waiting so far."""

    line: str
    waited: float = 0.0  # seconds spent waiting for room since the storage was first refused
    last: float = 0.0  # loop time of the latest refusal
    stored_again: bool = False


def out_of_storage(exc: BaseException) -> bool:
    """The server refused to store because its (or the account's) JetStream storage is full."""
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in OUT_OF_STORAGE


def params_stream_bytes(params_bytes: int, chunk_bytes: int) -> int:
    """What the parameter stream keeps, and reserves on the server: four versions of the
    parameters with their chunks' framing (followers start at most two versions back)."""
    return max(64 << 10, 4 * (params_bytes + (params_bytes // chunk_bytes + 1) * 512))


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def storage_type(settings: BusSettings, derived: bool = False) -> api.StorageType:
    """Where the server keeps a stream: the replay log and plans by `storage`, gradients and
    parameters (recomputable: lost ones are re-issued) by `derived_storage`."""
    kind = settings.derived_storage if derived else settings.storage
    return api.StorageType.FILE if kind == "file" else api.StorageType.MEMORY


class Streams:
    """The Bus's part that owns the job's stream topology, and what to say when the server's
    storage has no room for it."""

    settings: BusSettings
    job: str
    js: JetStreamContext
    chunk_bytes: int
    reconnects: int
    _kv_handles: dict  # Store's, dropped with the buckets
    _full: _Full | None = None  # the storage that was full, while waiting for room
    _params_bytes: int | None = None  # once this role created the job's streams: it owns them

    async def ensure_job_streams(self, params_bytes: int) -> None:
        """Create the job's streams (idempotent).  The params stream keeps a few versions.

        The role that calls this owns the streams: `restore_job_streams` creates them again."""
        self._params_bytes = params_bytes
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
                max_bytes=params_stream_bytes(params_bytes, self.chunk_bytes),
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
        ]
        for config in configs:
            await self._ensure_stream(config)

    async def restore_job_streams(self) -> bool:
        """Create again the job's streams a server lost (it restarted, and kept them in memory),
        if this role owns them; False if it does not."""
        if self._params_bytes is None:
            return False
        await self.ensure_job_streams(self._params_bytes)
        return True

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                if self._params_bytes is not None and self.reconnects:
                    log.warning("stream %s created again (the server had lost it)", config.name)
            except nats.js.errors.APIError as exc:
                raise await self.cannot_create(config, exc) from None

    async def cannot_create(self, config: api.StreamConfig, exc: nats.js.errors.APIError) -> BusError:
        """A one-line BusError for a stream (or a bucket's) the server would not create."""
        if not out_of_storage(exc):
            return BusError(f"cannot create stream {config.name}: {exc.description}")
        kind = "file" if config.storage == api.StorageType.FILE else "memory"
        reserve = f" the {megabytes(config.max_bytes)} it reserves" if (config.max_bytes or 0) > 0 else " it"
        return BusError(
            f"cannot create stream {config.name}: the server's JetStream {kind} storage has no room for"
            f"{reserve} ({await self._account_use(kind)}; err {exc.err_code}): " + FREES_SPACE.format(kind=kind)
        )

    async def wait_for_room(self, *, subject: str = "", stream: str = "") -> None:
        """The server refused to store on `subject` (or in `stream`) for want of storage.

        Says so once in one line (the stream, its size, what frees space) and waits a moment
        before the caller tries again.  Once this role has waited `full_store_wait` seconds in
        all for room, raises BusError with the same line: the role stops with the user-error
        code (a restart would not make room).  The waits add up while refusals keep coming,
        even with some stores succeeding between them (a store that work-queue gradients free
        and fill again lets a run crawl, each publish retried); a store that has refused
        nothing for `full_store_wait` seconds starts afresh.  Nothing the server acknowledged
        is lost either way."""
        loop = asyncio.get_running_loop()
        wait, now = self.settings.full_store_wait, loop.time()
        if self._full is None or now - self._full.last > wait:
            self._full = _Full(await self._full_storage(subject, stream))
            log.warning("%s; waiting up to %.0f s for room (PANGEA_FULL_STORE_WAIT)", self._full.line, wait)
            telemetry.STORE_FULL.inc()
        full = self._full
        full.last = now
        if full.waited >= wait:
            raise BusError(
                f"{full.line}; stopped after waiting {wait:.0f} s for room (nothing acknowledged is lost: "
                "with room, the same command with --resume true goes on)"
            )
        pause = min(ROOM_PAUSE, wait - full.waited)
        await asyncio.sleep(pause)
        full.waited += pause

    def room_again(self, where: str) -> None:
        """A store succeeded: say once that a full store took something again."""
        if self._full is not None and not self._full.stored_again:
            log.warning("JetStream stores again (%s): the run goes on", where)
            self._full.stored_again = True

    async def _full_storage(self, subject: str, stream: str) -> str:
        """One line for a store refused for want of room: the stream, its size, what the
        account holds, and the settings that free space."""
        try:
            name = stream or await self.js.find_stream_name_by_subject(subject)
            info = await self.js.stream_info(name)
        except nats.errors.Error:
            return f"JetStream storage is full: cannot store on {subject or stream}: " + FREES_SPACE.format(kind="file")
        kind = "file" if info.config.storage == api.StorageType.FILE else "memory"
        return (
            f"JetStream {kind} storage is full: stream {name} cannot take more "
            f"(it holds {megabytes(info.state.bytes)} in {info.state.messages:,} messages; "
            f"{await self._account_use(kind)}): " + FREES_SPACE.format(kind=kind)
        )

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

    async def _account_use(self, kind: str) -> str:
        """What the account holds in `kind` storage, and what streams with a size limit reserve
        there (the server sets their max_bytes aside when they are created), as a phrase."""
        try:
            account = await self.js.account_info()
            streams = [
                i
                for i in await self.js.streams_info()
                if (i.config.storage == api.StorageType.FILE) == (kind == "file")
            ]
        except nats.errors.Error:
            return "the account's use is unknown"
        used = account.storage if kind == "file" else account.memory
        phrase = f"the account stores {megabytes(used)} in {len(streams)} {kind} streams"
        limited = [i for i in streams if (i.config.max_bytes or 0) > 0]
        if limited:
            phrase += f" and reserves {megabytes(sum(i.config.max_bytes for i in limited))} for {len(limited)} of them"
        biggest = max(streams, key=lambda i: max(i.state.bytes, i.config.max_bytes or 0), default=None)
        if biggest is not None:
            size = max(biggest.state.bytes, biggest.config.max_bytes or 0)
            phrase += f", the largest {biggest.config.name} with {megabytes(size)}"
        return phrase
