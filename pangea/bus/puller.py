"""Reading a consumer: one long-lived pull request at a time, handed out one logical message
(reassembled if it came in frames) at a time, and a consumer lost with its server reported."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js import api

from pangea import telemetry
from pangea.bus import frames
from pangea.bus.backoff import RETRY_BUDGET
from pangea.bus.errors import BusError, ConsumerLost

log = logging.getLogger(__name__)

_CONSUMER_CHECK_SECONDS = 10.0  # after this long without messages, check the consumer still exists
_REOPEN_PAUSE = 0.5  # seconds between tries to recreate a lost consumer
_PULL_SECONDS = 30.0  # how long one pull request stays open on the server
_REFUSED_PAUSE = 0.05  # seconds before asking again after a pull refused outright (a 409)
_HEARTBEAT = "100"  # the status of an idle heartbeat or flow-control message (not the end of a pull)


@dataclass
class _Pull:
    """The pull request open on the server."""

    credit: int = 0  # messages it may still deliver
    ends: float = 0.0  # loop time after which it is surely over
    reconnects: int = -1  # the connection's reconnections when it was sent


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
    """A pull consumer read one logical message at a time.

    One long-lived pull request at a time (NATS ADR-37's "consume"): it asks for `batch`
    messages and stays open `_PULL_SECONDS`; the server delivers each message as it is stored,
    and a new request goes out once the last one was used up, ended (its 408 or 409 status) or
    lost with a reconnection.  A fetch per wait instead costs a no-wait probe and its 404, then
    a long poll and its 408, whenever the stream has nothing yet: ~14 of a tiny round's ~58
    messages at the server.  The requests go out on nats-py's pull subscription (its subject
    for requests, its inbox, its subscription), as its `fetch` sends them.

    `open_sub` creates (or binds to) its consumer; `reconnects` counts the connection's
    reconnections, after each of which the consumer is checked at the next quiet moment: a
    server that restarted may have lost it (a stream kept in memory goes with the server).
    """

    def __init__(
        self,
        open_sub: Callable[[], Awaitable],
        sub,
        batch: int,
        describe: str,
        reconnects: Callable[[], int],
        acks: bool = True,
    ) -> None:
        self._open_sub = open_sub
        self._acks = acks  # False: the server counts a message handled once delivered
        self._sub = sub
        self._batch = batch
        self._describe = describe
        self._reconnects = reconnects
        self._checked_reconnects = reconnects()
        self._pull = _Pull()
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
                return Delivery(msg.data, msg.subject, [msg] if self._acks else [])
            try:
                done = self._frames.add(msg)
            except frames.FrameError as exc:
                await self._refuse(msg, str(exc))
                continue
            if done is not None:
                return Delivery(done[0], msg.subject, done[1] if self._acks else [])

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
        self._drain()
        self._pull = _Pull()
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
        if self._acks:
            await msg.ack()

    async def _pop(self, timeout: float):
        """The next message of the consumer, or None after `timeout` seconds without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pull = self._pull
            if pull.credit <= 0 or loop.time() > pull.ends or self._reconnects() != pull.reconnects:
                if not await self._request(loop.time()):
                    await asyncio.sleep(max(0.0, min(deadline - loop.time(), 0.5)))
                    return None
            try:
                msg = await self._sub._sub.next_msg(timeout=max(0.001, deadline - loop.time()))
            except (TimeoutError, nats.errors.TimeoutError):
                return None
            except nats.errors.Error as exc:  # disconnected: the server restarts, we reconnect
                log.debug("pull on %s failed: %r", self._describe, exc)
                await asyncio.sleep(max(0.0, min(deadline - loop.time(), 0.5)))
                return None
            status = msg.headers.get(api.Header.STATUS) if msg.headers else None
            if status is None:
                self._pull.credit -= 1
                return msg
            if status != _HEARTBEAT:  # 408 expired, 409 ended (max bytes, leader change...), 404
                if status != "408" and self._pull.credit == self._batch:
                    # Refused before it delivered anything: pause, not a request per reply.
                    await asyncio.sleep(max(0.0, min(_REFUSED_PAUSE, deadline - loop.time())))
                self._pull.credit = 0

    async def _request(self, now: float) -> bool:
        """Open a pull request for `batch` messages; False if the connection is down."""
        request = {"batch": self._batch, "expires": int(_PULL_SECONDS * 1e9)}
        try:
            await self._sub._nc.publish(self._sub._nms, json.dumps(request).encode(), reply=self._sub._deliver)
        except nats.errors.Error as exc:
            log.debug("pull request on %s failed: %r", self._describe, exc)
            return False
        # Its end is the server's 408, which normally comes before this local bound.
        self._pull = _Pull(self._batch, now + _PULL_SECONDS + 1.0, self._reconnects())
        return True

    def _drain(self) -> list:
        """The messages delivered to us and not yet handled, taken off the subscription."""
        queue = self._sub._sub._pending_queue
        taken = []
        while not queue.empty():
            msg = queue.get_nowait()
            self._sub._sub._pending_size -= len(msg.data)
            if not (msg.headers and msg.headers.get(api.Header.STATUS)):
                taken.append(msg)
        return taken

    async def close(self) -> None:
        """Hand back what was delivered but not handled, so that it is redelivered at once."""
        for msg in self._drain() if self._acks else ():
            try:
                await msg.nak()
            except Exception:  # noqa: BLE001 - the server redelivers after ack_wait anyway
                pass
        try:
            await self._sub.unsubscribe()
        except Exception:  # noqa: BLE001 - closing a dead subscription is not an error
            pass
