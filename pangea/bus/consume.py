"""Reading a stream: a pull consumer handed out one logical message at a time."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pangea import telemetry
from pangea.bus import frames, subjects
from pangea.bus.errors import BusError
from pangea.bus.publish import PAYLOAD_HEADROOM
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

ACK_WAIT = 30.0  # an unacknowledged delivery comes back after this long
_FETCH_BYTES = 8 << 20  # most bytes one pull may ask for
_CONSUMER_CHECK_SECONDS = 10.0  # after this long without messages, check the consumer still exists


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
        except (TimeoutError, nats.errors.Error):
            pass  # the server is unreachable: the connection recovers on its own

    async def _refuse(self, msg, why: str) -> None:
        self.refused += 1
        log.warning("refused a frame on %s: %s", msg.subject, why)
        await msg.ack()

    async def _pop(self, timeout: float):
        if not self._buffer:
            try:
                self._buffer.extend(await self._sub.fetch(self._batch, timeout=timeout))
            except (TimeoutError, nats.errors.TimeoutError):
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


class Consuming:
    """The Bus's part that opens and inspects consumers."""

    settings: BusSettings
    job: str
    js: JetStreamContext
    max_payload: int
    chunk_bytes: int

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
        chunked: bool = False,
    ) -> Puller:
        """A pull consumer on the `what` stream of this job (or of `job`) filtered to `subject`.

        An ephemeral consumer (no durable name) goes away 10 minutes after its last pull.
        `chunked`: its messages are tensor chunks (gradients, parameters) of at most
        `chunk_bytes`, so a fetch may ask for more of them than of messages of the max payload
        (a process sending larger chunks than this one's setting makes fetches larger).
        """
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            max_ack_pending=max_ack_pending,
            ack_wait=ACK_WAIT,
            inactive_threshold=inactive_threshold or (None if durable else 600),
            headers_only=headers_only or None,
        )
        if start_sequence is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_sequence
        sub = await self.js.pull_subscribe(
            subject,
            durable=durable,
            stream=subjects.stream(job or self.job, what),
            config=config,
            pending_bytes_limit=1 << 30,
        )
        # One fetch must stay well under the server's per-client max_pending (64 MB by default):
        # beyond it the server cuts the connection as a slow consumer and the fetched messages
        # come back only after the ack wait (measured: 64 x 1 MB fetches stalled 30 s; and with
        # 32 MB fetches, a CPU-starved reader whose fetch timed out before it read the socket
        # asked again, and two 32 MB pulls were cut).
        largest = self.chunk_bytes + PAYLOAD_HEADROOM if chunked else self.max_payload
        batch = max(1, min(batch, _FETCH_BYTES // largest))
        return Puller(sub, batch, subject)

    async def last_sequence_and_payload(self, what: str, subject: str) -> tuple[int, bytes] | None:
        """The last message stored on `subject`, or None if there is none."""
        try:
            msg = await self.js.get_last_msg(subjects.stream(self.job, what), subject)
        except nats.js.errors.NotFoundError:
            return None
        return msg.seq, msg.data

    async def reclaim(self, what: str, durable: str) -> int | None:
        """Take over a durable consumer whose last reader died holding deliveries: delete it and
        return the stream sequence to create it again from (its first unacknowledged message), so
        those messages come at once instead of after the ack wait.  None when it does not exist or
        holds nothing unacknowledged (it is then used as it is).

        A restarted worker's previous process had fetched its next batches (the orchestrator plans
        ahead) and died before acknowledging them: without this the restarted worker idles for
        ACK_WAIT while its round waits for it.  Messages acknowledged beyond the ack floor come
        again; every role drops those as duplicates."""
        stream = subjects.stream(self.job, what)
        try:
            info = await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return None
        if not info.num_ack_pending:
            return None
        start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
        await self.delete_consumer(what, durable)
        log.info("%s: took over %d unacknowledged deliveries (from sequence %d)", durable, info.num_ack_pending, start)
        return start

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
