"""Key-value and object-store buckets: small records and blobs, retried across a server restart."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pangea.bus.backoff import Backoff
from pangea.bus.errors import BusError
from pangea.bus.streams import out_of_storage, storage_type
from pangea.settings import BusSettings

log = logging.getLogger(__name__)


class Store:
    """The Bus's part that reads and writes KV and object-store buckets."""

    settings: BusSettings
    job: str
    js: JetStreamContext
    closing: bool
    _kv_handles: dict  # bucket -> nats-py KeyValue (`_kv_handle`)
    cannot_create: Callable[..., Awaitable[BusError]]  # Streams': what the server refused and why
    wait_for_room: Callable[..., Awaitable[None]]
    room_again: Callable[[str], None]

    async def _retrying(self, what: str, operation, stream: str = ""):
        """Run `operation()` again while the connection is down (server restart), within the
        budget; while the server has no room to store in `stream`, as `wait_for_room` says."""
        backoff = Backoff(0.1)
        while True:
            try:
                found = await operation()
                if stream:
                    self.room_again(stream)
                return found
            except (TimeoutError, nats.errors.Error) as exc:
                if stream and out_of_storage(exc) and not self.closing:
                    await self.wait_for_room(stream=stream)
                    continue
                if self.closing or not await backoff.wait():
                    raise BusError(f"{what} failed: {exc!r}") from None
                log.debug("%s: %r; retrying", what, exc)

    async def put_object(self, bucket: str, name: str, data: bytes | BinaryIO) -> None:
        """Store a blob (bytes, or a seekable binary file read from its start) in an Object Store
        bucket (created if needed), replacing the old one."""

        async def put() -> None:
            store = await self._object_store(bucket)
            if not isinstance(data, bytes):
                data.seek(0)  # each try, and each name the same file is stored under, reads it all
            await store.put(name, data)

        await self._retrying(f"storing {bucket}/{name}", put, stream=f"OBJ_{bucket}")

    async def get_object(self, bucket: str, name: str) -> bytes | None:
        """A blob from an Object Store bucket, or None if there is none."""

        async def get() -> bytes | None:
            try:
                store = await self.js.object_store(bucket)
                return (await store.get(name)).data
            except (
                nats.js.errors.BucketNotFoundError,
                nats.js.errors.ObjectNotFoundError,
                nats.js.errors.NotFoundError,
            ):
                return None

        return await self._retrying(f"reading {bucket}/{name}", get)

    async def list_objects(self, bucket: str) -> list[str]:
        """Names of the live objects in a bucket (empty if there is no such bucket)."""

        async def names() -> list[str]:
            try:
                store = await self.js.object_store(bucket)
                return [info.name for info in await store.list(ignore_deletes=True)]
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                return []

        return await self._retrying(f"listing {bucket}", names)

    async def delete_object(self, bucket: str, name: str) -> None:
        async def delete() -> None:
            try:
                await (await self.js.object_store(bucket)).delete(name)
            except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
                pass

        await self._retrying(f"deleting {bucket}/{name}", delete)

    async def _object_store(self, bucket: str):
        try:
            return await self.js.object_store(bucket)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            storage = storage_type(self.settings)
            try:
                return await self.js.create_object_store(
                    bucket,
                    config=api.ObjectStoreConfig(bucket=bucket, storage=storage, replicas=self.settings.replicas),
                )
            except nats.js.errors.APIError as exc:
                raise await self.cannot_create(api.StreamConfig(name=f"OBJ_{bucket}", storage=storage), exc) from None

    async def kv(self, bucket: str, ttl: float | None = None):
        """Open a KV bucket, creating it if needed."""
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            storage = storage_type(self.settings)
            try:
                return await self.js.create_key_value(
                    bucket=bucket, ttl=ttl, history=1, storage=storage, replicas=self.settings.replicas
                )
            except nats.js.errors.APIError as exc:
                raise await self.cannot_create(api.StreamConfig(name=f"KV_{bucket}", storage=storage), exc) from None

    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        """A KV value, or None if the bucket or the key does not exist."""

        async def get() -> bytes | None:
            try:
                return (await (await self._kv_handle(bucket)).get(key)).value
            except nats.js.errors.KeyNotFoundError:
                return None
            except nats.js.errors.NotFoundError:  # the bucket (BucketNotFoundError is one)
                self._kv_handles.pop(bucket, None)
                return None

        return await self._retrying(f"reading {bucket}/{key}", get)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        """Set a KV value (the bucket must exist)."""

        async def put() -> None:
            try:
                await (await self._kv_handle(bucket)).put(key, value)
            except (TimeoutError, nats.errors.Error):
                self._kv_handles.pop(bucket, None)  # looked up again next time: it may be gone
                raise

        await self._retrying(f"writing {bucket}/{key}", put, stream=f"KV_{bucket}")

    async def _kv_handle(self, bucket: str):
        """The bucket's KV handle, looked up once: each lookup is a stream-info request (measured:
        a round's progress write was two requests, and their JSON ~5% of the orchestrator's CPU)."""
        if bucket not in self._kv_handles:
            self._kv_handles[bucket] = await self.js.key_value(bucket)
        return self._kv_handles[bucket]

    async def kv_watch(self, bucket: str):
        """A watcher of every key of a bucket: its latest values, then each change as it is
        written (`async for entry in watcher`; None once the latest values are through)."""
        kv = await self.js.key_value(bucket)
        return await kv.watchall()

    async def kv_items(self, bucket: str) -> dict[str, bytes]:
        """All live keys of a bucket and their values."""

        # Keys come from the bucket stream's subject list, not `kv.keys()`: that one creates a
        # consumer per call (they pile up on the server) and was seen to list only some keys
        # while others were being written, which made live workers look gone.
        prefix = f"$KV.{bucket}."

        async def items() -> dict[str, bytes]:
            try:
                kv = await self.js.key_value(bucket)
                info = await self.js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                return {}
            keys = sorted(subject[len(prefix) :] for subject in (info.state.subjects or {}))
            found = {}
            for key in keys:
                try:
                    found[key] = (await kv.get(key)).value
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    continue
            return found

        return await self._retrying(f"listing {bucket}", items)
