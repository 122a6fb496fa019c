"""Opening and inspecting consumers: pulls of a job's streams, sized to the server, and durable
consumers taken over, counted and deleted."""

from __future__ import annotations

import logging
from dataclasses import replace

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pangea.bus import subjects
from pangea.bus.publish import PAYLOAD_HEADROOM
from pangea.bus.puller import Puller
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

ACK_WAIT = 30.0  # an unacknowledged delivery comes back after this long
_FETCH_BYTES = 8 << 20  # most bytes one pull may ask for


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
        acks: bool = True,
    ) -> Puller:
        """A pull consumer on the `what` stream of this job (or of `job`) filtered to `subject`.

        An ephemeral consumer (no durable name) goes away 10 minutes after its last pull.
        `chunked`: its messages are tensor chunks (gradients, parameters) of at most
        `chunk_bytes`, so a fetch may ask for more of them than of messages of the max payload
        (a process sending larger chunks than this one's setting makes fetches larger).
        `acks=False`: the server counts a message handled once it is delivered, and no ack per
        message goes back; for a reader that can start again from a known point on its own.
        """
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT if acks else api.AckPolicy.NONE,
            max_ack_pending=max_ack_pending if acks else None,
            ack_wait=ACK_WAIT if acks else None,
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
        return Puller(open_sub, sub, batch, subject, lambda: self.reconnects, acks)

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
