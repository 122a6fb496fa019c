"""Reading a stream: a pull consumer handed out one logical message at a time."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pangea import telemetry
from pangea.bus import frames, subjects
from pangea.bus.backoff import RETRY_BUDGET
from pangea.bus.errors import BusError, ConsumerLost
from pangea.bus.publish import PAYLOAD_HEADROOM
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

ACK_WAIT = 30.0  # an unacknowledged delivery comes back after this long
_FETCH_BYTES = 8 << 20  # most bytes one pull may ask for
_CONSUMER_CHECK_SECONDS = 10.0  # after this long without messages, check the consumer still exists
_REOPEN_PAUSE = 0.5  # seconds between tries to recreate a lost consumer


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
    """A pull consumer read one logical message at a time, fetching in batches.

    `open_sub` creates (or binds to) its consumer; `reconnects` counts the connection's
    reconnections, after each of which the consumer is checked at the next quiet moment: a
    server that restarted may have lost it (a stream kept in memory goes with the server).
    """

    def __init__(
        self, open_sub: Callable[[], Awaitable], sub, batch: int, describe: str, reconnects: Callable[[], int]
    ) -> None:
        self._open_sub = open_sub
        self._sub = sub
        self._batch = batch
        self._describe = describe
        self._reconnects = reconnects
        self._checked_reconnects = reconnects()
        self._buffer: deque = deque()
        self._frames = frames.Reassembler()
        self.refused = 0  # malformed or stray frames, acked and dropped
        self._quiet_since = asyncio.get_event_loop().time()

    async def next(self, timeout: float) -> Delivery | None:
        """The next message, or None if nothing complete arrived within `timeout` seconds.

        Raises ConsumerLost if the consumer disappeared (the server answers pulls of a deleted
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
        reconnected = self._reconnects() != self._checked_reconnects
        if not reconnected and now - self._quiet_since < _CONSUMER_CHECK_SECONDS:
            return
        self._quiet_since = now
        try:
            await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            raise ConsumerLost(
                f"the consumer of {self._describe} is gone (its job was deleted, or its server restarted "
                "and lost the stream)"
            ) from None
        except (TimeoutError, nats.errors.Error):
            return  # the server is unreachable: the connection recovers on its own, and we check again
        self._checked_reconnects = self._reconnects()

    async def reopen(self, budget: float = RETRY_BUDGET) -> None:
        """Create the lost consumer again, once its stream exists again (the role that owns the
        stream recreates it), reading the stream from its start; BusError after `budget` seconds.
        What was fetched from the lost consumer is dropped: the server lost it too."""
        self._buffer.clear()
        self._frames = frames.Reassembler()
        try:
            await self._sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the old subscription may be dead already
            pass
        loop = asyncio.get_running_loop()
        give_up = loop.time() + budget
        while True:
            try:
                self._sub = await self._open_sub()
                break
            except (TimeoutError, nats.errors.Error) as exc:  # the stream is not back yet, or no server
                if loop.time() + _REOPEN_PAUSE > give_up:
                    raise BusError(
                        f"cannot recreate the consumer of {self._describe} within {budget:.0f} s: {exc!r}"
                    ) from None
                await asyncio.sleep(_REOPEN_PAUSE)
        self._checked_reconnects = self._reconnects()
        self._quiet_since = loop.time()
        log.warning("the consumer of %s is back", self._describe)

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
    reconnects: int

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
        stream = subjects.stream(job or self.job, what)

        async def open_sub(start: int | None = None):
            opened = replace(config)
            if start is not None:
                opened.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                opened.opt_start_seq = start
            return await self.js.pull_subscribe(
                subject, durable=durable, stream=stream, config=opened, pending_bytes_limit=1 << 30
            )

        sub = await open_sub(start_sequence)
        # One fetch must stay well under the server's per-client max_pending (64 MB by default):
        # beyond it the server cuts the connection as a slow consumer and the fetched messages
        # come back only after the ack wait (measured: 64 x 1 MB fetches stalled 30 s; and with
        # 32 MB fetches, a CPU-starved reader whose fetch timed out before it read the socket
        # asked again, and two 32 MB pulls were cut).
        largest = self.chunk_bytes + PAYLOAD_HEADROOM if chunked else self.max_payload
        batch = max(1, min(batch, _FETCH_BYTES // largest))
        return Puller(open_sub, sub, batch, subject, lambda: self.reconnects)

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
