"""Publishing: JetStream messages with a window in flight, each stored once; core NATS events."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from pangea import telemetry
from pangea.bus import frames
from pangea.bus.backoff import Backoff
from pangea.bus.connection import ACK_TIMEOUT
from pangea.bus.errors import BusError
from pangea.bus.streams import out_of_storage
from pangea.settings import BusSettings

log = logging.getLogger(__name__)

# Room for headers and capnp framing inside the server's max payload.
PAYLOAD_HEADROOM = 8 * 1024


class Publishing:
    """The Bus's part that sends: flow-controlled JetStream publishes and fire-and-forget events."""

    settings: BusSettings
    job: str
    js: JetStreamContext
    nc: Client
    closing: bool
    max_payload: int
    wait_for_room: Callable[..., Awaitable[None]]  # Streams': a full store
    room_again: Callable[[str], None]
    restore_job_streams: Callable[[], Awaitable[bool]]  # Streams': a stream the server lost

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
                while pending and (
                    len(pending) >= self.settings.publish_window
                    or in_flight + len(data) > self.settings.publish_window_bytes
                ):
                    in_flight -= len(pending[0][0][1])
                    sequences.append(await self._settle(*pending.popleft()))
                pending.append((frame, await self._send(frame)))
                in_flight += len(data)
        while pending:
            sequences.append(await self._settle(*pending.popleft()))
        return sequences

    async def _send(self, frame, backoff: Backoff | None = None):
        backoff = backoff or Backoff(0.05)
        while True:
            try:
                return await self.js.publish_async(frame[0], frame[1], headers=dict(frame[2]))
            except nats.errors.Error as exc:  # reconnecting, buffer full, closed...
                if self.closing or not await backoff.wait():
                    raise BusError(f"cannot publish to {frame[0]}: {exc!r}") from None

    async def _settle(self, frame, future) -> int:
        backoff = Backoff(0.05)
        while True:
            try:
                ack = await asyncio.wait_for(future, ACK_TIMEOUT)
                self.room_again(frame[0])
                return ack.seq
            except (TimeoutError, nats.errors.Error) as exc:
                if out_of_storage(exc) and not self.closing:
                    await self.wait_for_room(subject=frame[0])
                elif isinstance(exc, NoStreamResponseError) and not self.closing and await self.restore_job_streams():
                    pass  # a restarted server lost the stream (memory storage), and this role made it again
                elif self.closing or not await backoff.wait():
                    raise BusError(f"the server did not store a message on {frame[0]}: {exc!r}") from None
                else:
                    log.warning("publish to %s not acknowledged (%r); sending it again", frame[0], exc)
                future = await self._send(frame, Backoff(0.05, give_up_at=backoff.give_up_at))

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
