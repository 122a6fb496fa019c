"""The one place that talks to NATS: connect, streams, pulls, flow-controlled publishes, KV.

Roles see bytes and `Delivery` objects; they never import nats.  Every JetStream publish
carries a `Nats-Msg-Id`, so a retried publish is stored once, and is retried until the
server acknowledges it: nothing is dropped silently, and a full stream or a slow
consumer slows the publisher down instead of losing data.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from pangea import telemetry
from pangea.bus import frames, subjects
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

# Room for headers and capnp framing inside the server's max payload.
PAYLOAD_HEADROOM = 8 * 1024
_ACK_TIMEOUT = 10.0  # one acknowledgement; a lost one is resent (the msg id makes that safe)
_RETRY_BUDGET = 300.0  # seconds of retries before a publish fails; well inside DUPLICATE_WINDOW
DUPLICATE_WINDOW = 600.0
_ACK_WAIT = 30.0  # an unacknowledged delivery comes back after this long
_PENDING_SIZE = 128 << 20  # client-side buffer while reconnecting
_FETCH_BYTES = 32 << 20  # most bytes one pull may ask for
_CONSUMER_CHECK_SECONDS = 10.0  # after this long without messages, check the consumer still exists


class BusError(RuntimeError):
    """The bus is unreachable or refused an operation; the message says what to change."""


def _credentials(settings: BusSettings) -> dict:
    """nats.connect() keyword arguments for the configured authentication and TLS."""
    options: dict = {}
    if settings.nats_token:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    if settings.nats_nkey_seed:
        options["nkeys_seed"] = str(settings.nats_nkey_seed)
    if settings.nats_creds:
        options["user_credentials"] = str(settings.nats_creds)
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
        options["tls"] = context
    return options


@dataclass
class Delivery:
    """One logical message pulled from a stream (reassembled if it came in frames)."""

    payload: bytes
    subject: str
    _msgs: list = field(default_factory=list, repr=False)

    async def ack(self) -> None:
        """Acknowledge; if the connection is down the ack is lost and the message comes back,
        which every role handles as a duplicate."""
        try:
            for msg in self._msgs:
                await msg.ack()
        except nats.errors.Error as exc:
            log.debug("ack lost: %r", exc)

    async def in_progress(self) -> None:
        """Tell the server the message is still being worked on (resets its ack wait)."""
        try:
            for msg in self._msgs:
                await msg.in_progress()
        except nats.errors.Error as exc:
            log.debug("in-progress lost: %r", exc)


class Puller:
    """A pull consumer read one logical message at a time, fetching in batches."""

    def __init__(self, sub, batch: int, describe: str) -> None:
        self._sub = sub
        self._batch = batch
        self._describe = describe
        self._buffer: deque = deque()
        self._frames = frames.Reassembler()
        self.refused = 0  # malformed or stray frames, acked and dropped
        self._quiet_since = asyncio.get_event_loop().time()

    async def next(self, timeout: float) -> Delivery | None:
        """The next message, or None if nothing complete arrived within `timeout` seconds.

        Raises BusError if the consumer disappeared (the server answers pulls of a deleted
        consumer with nothing at all, which would otherwise look like an idle stream).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for stale in self._frames.expire():
                await self._refuse(stale, "incomplete message expired")
            msg = await self._pop(max(0.001, deadline - loop.time()))
            if msg is None:
                await self._check_consumer(loop.time())
                return None
            self._quiet_since = loop.time()
            telemetry.BYTES_IN.inc(len(msg.data))
            if not frames.is_frame(msg):
                return Delivery(msg.data, msg.subject, [msg])
            try:
                done = self._frames.add(msg)
            except frames.FrameError as exc:
                await self._refuse(msg, str(exc))
                continue
            if done is not None:
                return Delivery(done[0], msg.subject, done[1])

    async def _check_consumer(self, now: float) -> None:
        if now - self._quiet_since < _CONSUMER_CHECK_SECONDS:
            return
        self._quiet_since = now
        try:
            await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            raise BusError(f"the consumer of {self._describe} is gone (job deleted, or its server lost)") from None
        except (nats.errors.Error, asyncio.TimeoutError):
            pass  # the server is unreachable: the connection recovers on its own

    async def _refuse(self, msg, why: str) -> None:
        self.refused += 1
        log.warning("refused a frame on %s: %s", msg.subject, why)
        await msg.ack()

    async def _pop(self, timeout: float):
        if not self._buffer:
            try:
                self._buffer.extend(await self._sub.fetch(self._batch, timeout=timeout))
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return None
            except nats.errors.Error as exc:  # disconnected: the server restarts, we reconnect
                log.debug("fetch on %s failed: %r", self._describe, exc)
                await asyncio.sleep(min(timeout, 0.5))
                return None
        return self._buffer.popleft() if self._buffer else None

    async def close(self) -> None:
        """Hand back what was fetched but not handled, so that it is redelivered at once."""
        while self._buffer:
            try:
                await self._buffer.popleft().nak()
            except Exception:  # noqa: BLE001 - the server redelivers after ack_wait anyway
                pass
        try:
            await self._sub.unsubscribe()
        except Exception:  # noqa: BLE001 - closing a dead subscription is not an error
            pass


class Bus:
    """A connection to NATS JetStream for one role of one job."""

    def __init__(self, settings: BusSettings, nc, js) -> None:
        self.settings = settings
        self.job = settings.job
        self.nc = nc
        self.js = js
        self.closing = False

    @classmethod
    async def connect(cls, settings: BusSettings, name: str) -> Bus:
        """Connect, retrying until `connect_timeout`; BusError with the URL if nobody answers."""
        servers = settings.servers
        if not servers:
            raise BusError("no NATS URL: set PANGEA_NATS_URL (pangea run starts an embedded server)")
        holder: dict[str, Bus] = {}

        async def on_error(exc: Exception) -> None:
            # Before the first connection the caller reports the failure in one line.
            if "bus" in holder and not holder["bus"].closing:
                log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            if not ("bus" in holder and holder["bus"].closing):
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            telemetry.RECONNECTS.inc()
            log.warning("reconnected to NATS")

        try:
            # nats-py retries the server list itself; the timeout bounds the whole attempt.
            nc = await asyncio.wait_for(
                nats.connect(
                    **_credentials(settings),
                    servers=servers,
                    name=f"pangea-{settings.job}-{name}",
                    connect_timeout=min(2.0, settings.connect_timeout),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    pending_size=_PENDING_SIZE,
                ),
                settings.connect_timeout,
            )
        except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
            if "authorization" in str(exc).lower():
                raise BusError(f"NATS at {settings.nats_url} refused our credentials ({exc})") from None
            raise BusError(
                f"cannot reach NATS at {settings.nats_url} within {settings.connect_timeout:g}s"
                + (f" ({exc})" if str(exc) else "")
            ) from None
        js = nc.jetstream(timeout=_ACK_TIMEOUT, publish_async_max_pending=max(settings.publish_window * 4, 256))
        try:
            await js.account_info()
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            await nc.close()
            raise BusError(f"NATS at {settings.nats_url} has no JetStream (start nats-server with -js): {exc}") from None
        bus = cls(settings, nc, js)
        holder["bus"] = bus
        return bus

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def chunk_bytes(self) -> int:
        """Largest tensor payload per message: the setting, capped by the server's max payload."""
        return max(1024, min(self.settings.chunk_bytes, self.max_payload - PAYLOAD_HEADROOM))

    async def close(self) -> None:
        """Flush what we sent (acks included) and close.  Not drain: pending pulls would stall it."""
        self.closing = True
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=5)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        await self.nc.close()

    # ------------------------------------------------------------ streams and buckets

    async def ensure_job_streams(self, params_bytes: int) -> None:
        """Create the job's streams (idempotent).  The params stream keeps a few versions."""
        storage = api.StorageType.FILE if self.settings.storage == "file" else api.StorageType.MEMORY
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
                name=subjects.stream(job, "plans"), subjects=[subjects.plans(job)], storage=storage,
                duplicate_window=DUPLICATE_WINDOW, num_replicas=self.settings.replicas,
            ),
            api.StreamConfig(
                name=subjects.stream(job, "grads"),
                subjects=[subjects.grads(job), subjects.shard_grads(job), subjects.reduced(job)],
                storage=storage,
                retention=api.RetentionPolicy.WORK_QUEUE,
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.settings.replicas,
            ),
            api.StreamConfig(
                name=subjects.stream(job, "params"),
                subjects=[subjects.params(job)],
                storage=storage,
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
            try:
                await self.js.delete_key_value(bucket)
            except nats.js.errors.NotFoundError:
                pass
        try:
            await self.js.delete_object_store(subjects.checkpoint_bucket(self.job))
        except nats.js.errors.NotFoundError:
            pass

    async def _retrying(self, what: str, operation):
        """Run `operation()` again while the connection is down (server restart), within the budget."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _RETRY_BUDGET
        delay = 0.1
        while True:
            try:
                return await operation()
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                if self.closing or loop.time() + delay > give_up_at:
                    raise BusError(f"{what} failed: {exc!r}") from None
                log.debug("%s: %r; retrying", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def put_object(self, bucket: str, name: str, data: bytes) -> None:
        """Store a blob in an Object Store bucket (created if needed), replacing the old one."""

        async def put() -> None:
            store = await self._object_store(bucket)
            await store.put(name, data)

        await self._retrying(f"storing {bucket}/{name}", put)

    async def get_object(self, bucket: str, name: str) -> bytes | None:
        """A blob from an Object Store bucket, or None if there is none."""

        async def get() -> bytes | None:
            try:
                store = await self.js.object_store(bucket)
                return (await store.get(name)).data
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.ObjectNotFoundError,
                    nats.js.errors.NotFoundError):
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
            storage = api.StorageType.FILE if self.settings.storage == "file" else api.StorageType.MEMORY
            return await self.js.create_object_store(bucket, config=api.ObjectStoreConfig(
                bucket=bucket, storage=storage, replicas=self.settings.replicas))

    async def kv(self, bucket: str, ttl: float | None = None):
        """Open a KV bucket, creating it if needed."""
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            storage = api.StorageType.FILE if self.settings.storage == "file" else api.StorageType.MEMORY
            return await self.js.create_key_value(
                bucket=bucket, ttl=ttl, history=1, storage=storage, replicas=self.settings.replicas)

    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        """A KV value, or None if the bucket or the key does not exist."""

        async def get() -> bytes | None:
            try:
                kv = await self.js.key_value(bucket)
                return (await kv.get(key)).value
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError,
                    nats.js.errors.NotFoundError):
                return None

        return await self._retrying(f"reading {bucket}/{key}", get)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        """Set a KV value (the bucket must exist)."""

        async def put() -> None:
            kv = await self.js.key_value(bucket)
            await kv.put(key, value)

        await self._retrying(f"writing {bucket}/{key}", put)

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
            keys = sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))
            found = {}
            for key in keys:
                try:
                    found[key] = (await kv.get(key)).value
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    continue
            return found

        return await self._retrying(f"listing {bucket}", items)

    # ------------------------------------------------------------ consuming

    async def pull(
        self,
        what: str,
        subject: str,
        durable: str | None,
        *,
        start_sequence: int | None = None,
        batch: int = 64,
        max_ack_pending: int = 20_000,
        job: str | None = None,
        inactive_threshold: float | None = None,
        headers_only: bool = False,
    ) -> Puller:
        """A pull consumer on the `what` stream of this job (or of `job`) filtered to `subject`.

        An ephemeral consumer (no durable name) goes away 10 minutes after its last pull.
        """
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            max_ack_pending=max_ack_pending,
            ack_wait=_ACK_WAIT,
            inactive_threshold=inactive_threshold or (None if durable else 600),
            headers_only=headers_only or None,
        )
        if start_sequence is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_sequence
        sub = await self.js.pull_subscribe(
            subject, durable=durable, stream=subjects.stream(job or self.job, what), config=config,
            pending_bytes_limit=1 << 30,
        )
        # One fetch must stay well under the server's per-client max_pending (64 MB by default):
        # beyond it the server cuts the connection as a slow consumer and the fetched messages
        # come back only after the ack wait (measured: 64 x 1 MB fetches stalled 30 s).
        batch = max(1, min(batch, _FETCH_BYTES // self.max_payload))
        return Puller(sub, batch, subject)

    async def last_sequence_and_payload(self, what: str, subject: str) -> tuple[int, bytes] | None:
        """The last message stored on `subject`, or None if there is none."""
        try:
            msg = await self.js.get_last_msg(subjects.stream(self.job, what), subject)
        except nats.js.errors.NotFoundError:
            return None
        return msg.seq, msg.data

    async def delete_consumer(self, what: str, durable: str, job: str | None = None) -> None:
        try:
            await self.js.delete_consumer(subjects.stream(job or self.job, what), durable)
        except nats.js.errors.NotFoundError:
            pass

    async def consumer_backlog(self, what: str, durable: str) -> tuple[int, int] | None:
        """(messages not yet delivered, delivered but unacknowledged) of a durable consumer."""
        try:
            info = await self.js.consumer_info(subjects.stream(self.job, what), durable)
        except nats.js.errors.NotFoundError:
            return None
        return info.num_pending, info.num_ack_pending

    # ------------------------------------------------------------ publishing

    async def publish(self, items: Iterable[tuple[str, bytes, str]]) -> list[int]:
        """Store (subject, payload, msg_id) messages in JetStream, `publish_window` in flight.

        A payload above the server's max payload is sent as frames.  Returns the stream
        sequence of every stored frame, once the server acknowledged each one; a message
        the server does not acknowledge is sent again (same msg id: stored once) until
        the retry budget runs out, then BusError.
        """
        if self.settings.net_delay:  # PANGEA_NET_DELAY: a slow link's latency, for experiments
            await asyncio.sleep(self.settings.net_delay)
        limit = self.max_payload - PAYLOAD_HEADROOM
        pending: deque = deque()
        sequences: list[int] = []
        in_flight = 0
        for subject, payload, msg_id in items:
            for data, headers in frames.split(payload, limit, msg_id):
                telemetry.BYTES_OUT.inc(len(data))
                frame = (subject, data, headers)
                # Bounded in messages and in bytes: many large unacknowledged publishes make
                # acks arrive late (measured: 16 x 1 MB in flight is 30x slower than 4).
                while pending and (len(pending) >= self.settings.publish_window
                                   or in_flight + len(data) > self.settings.publish_window_bytes):
                    in_flight -= len(pending[0][0][1])
                    sequences.append(await self._settle(*pending.popleft()))
                pending.append((frame, await self._send(frame)))
                in_flight += len(data)
        while pending:
            sequences.append(await self._settle(*pending.popleft()))
        return sequences

    async def _send(self, frame, give_up_at: float | None = None):
        loop = asyncio.get_running_loop()
        give_up_at = give_up_at or loop.time() + _RETRY_BUDGET
        delay = 0.05
        while True:
            try:
                return await self.js.publish_async(frame[0], frame[1], headers=dict(frame[2]))
            except nats.errors.Error as exc:  # reconnecting, buffer full, closed...
                if self.closing or loop.time() + delay > give_up_at:
                    raise BusError(f"cannot publish to {frame[0]}: {exc!r}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _settle(self, frame, future) -> int:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _RETRY_BUDGET
        delay = 0.05
        while True:
            try:
                ack = await asyncio.wait_for(future, _ACK_TIMEOUT)
                return ack.seq
            except (asyncio.TimeoutError, nats.errors.Error) as exc:
                if self.closing or loop.time() + delay > give_up_at:
                    raise BusError(f"the server did not store a message on {frame[0]}: {exc!r}") from None
                log.warning("publish to %s not acknowledged (%r); sending it again", frame[0], exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                future = await self._send(frame, give_up_at)

    async def publish_event(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget core NATS message (progress events; losing one is harmless)."""
        try:
            await self.nc.publish(subject, payload)
        except nats.errors.Error as exc:
            log.debug("event on %s lost: %r", subject, exc)

    async def subscribe_events(self, subject: str, callback) -> None:
        async def handler(msg) -> None:
            await callback(msg.data)

        await self.nc.subscribe(subject, cb=handler)
