"""A worker's side of the fan-out: the parameter stream read into whole versions, in order.

Versions are compared as (generation, version): a restarted orchestrator starts a new
generation, which may go back to the round of its checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from pangea.bus import subjects
from pangea.bus.client import Bus, ConsumerLost, Puller
from pangea.wire import codec
from pangea.wire.chunking import Assembler
from pangea.wire.messages import Params

log = logging.getLogger(__name__)

Stamp = tuple[int, int]  # (generation, version)


class ParamsFollower:
    """Chunks of parameter versions assembled; each whole newer version handed to `apply`."""

    def __init__(self, bus: Bus, layout_hash: str, numel: int, apply: Callable[[np.ndarray], None]) -> None:
        self.bus = bus
        self.layout_hash = layout_hash
        self.apply = apply
        self.assembler = Assembler(numel)
        self.stamp: Stamp = (-1, -1)  # of the version last applied
        self.final = False  # that version was the job's last
        self.rejected = 0
        self.consumer: Puller | None = None

    async def subscribe(self, durable: str, inactive_threshold: float) -> None:
        """Read from two versions' worth of chunks before the last stored one.

        A retried publish can store a version's chunks out of order, but never a chunk of
        version v after version v+1 began; so two versions back covers the latest whole one.
        """
        subject = subjects.params(self.bus.job)
        last = await self.bus.last_sequence_and_payload("params", subject)
        start = None
        if last is not None:
            seq, raw = last
            try:
                start = max(1, seq - 2 * codec.decode(raw, Params).chunk.count + 1)
            except codec.CodecError:
                start = None
        # Durable (so it is replicated with the stream and survives losing a cluster node),
        # removed by the server once the worker is gone for a while.  Without acks (one message
        # fewer per chunk): what it delivered counts as read, so a restarted worker's consumer
        # is made afresh from two versions back, not taken over from where its last process was.
        await self.bus.delete_consumer("params", durable)
        self.consumer = await self.bus.pull(
            "params",
            subject,
            durable=durable,
            start_sequence=start,
            batch=256,
            inactive_threshold=inactive_threshold,
            chunked=True,
            acks=False,
        )

    async def read(self, until: Stamp | None, timeout: float = 1.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Apply versions as they complete; with `until`, wait until the stamp reaches it (or `stop()`)."""
        waited = time.monotonic()
        while until is None or self.stamp < until:
            if until is not None and stop():
                return
            try:
                delivery = await self.consumer.next(timeout=timeout)
            except ConsumerLost as exc:  # the orchestrator creates the stream again and republishes
                log.warning("%s: waiting for the orchestrator to publish the parameters again", exc)
                await self.consumer.reopen()
                continue
            if delivery is None:
                if until is None:
                    return
                if time.monotonic() - waited > 30:
                    log.info("still waiting for parameters %s (have %s)", until, self.stamp)
                    waited = time.monotonic()
                continue
            try:
                params = codec.decode(delivery.payload, Params)
                if params.layout_hash != self.layout_hash:
                    raise codec.CodecError("parameters of another model layout")
                stamp = (params.generation, params.version)
                if stamp > self.stamp:
                    self.assembler.add(stamp, params.chunk, params.values.numpy())
            except (codec.CodecError, ValueError) as exc:
                self.rejected += 1
                log.warning("rejected (malformed): params: %s", exc)
            else:
                if self.assembler.complete and self.assembler.version > self.stamp:
                    self.apply(self.assembler.buffer)
                    self.stamp = self.assembler.version
                    self.final = params.final
            await delivery.ack()
            if self.final:
                return

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.close()
