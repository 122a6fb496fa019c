"""A worker: pulls its shards, computes gradients at the matching parameter version, publishes.

Joining is subscribing: the worker creates its batch consumer, reads the latest
parameters, then announces itself with a heartbeat; the orchestrator plans it in from the
next round.  For each batch of round r it needs parameters version r exactly: an older
version is waited for, a newer one means the round is over and the batch is dropped.  Round
r's batch usually comes while round r-1 is still being reduced (the orchestrator plans one
round ahead), so the worker holds it when parameters r arrive.

The worker is three parts: this loop (batches in, gradients out, membership), its
`Replica` (the model and what it computes) and its `ParamsFollower` (versions in).
Why one module of ~300 lines: the loop, its wait for parameters (which may take a re-issued
batch first) and the three modes' ways through it are one sequence, read top to bottom.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.roles.code import fetch_code
from pangea.roles.follower import ParamsFollower
from pangea.roles.jobspec import wait_for_job_spec
from pangea.roles.replica import Replica, pick_device
from pangea.settings import WorkerSettings
from pangea.train import kernels
from pangea.wire import codec
from pangea.wire.messages import Batch, Gradient, Heartbeat

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass
class Held:
    """Batches a worker keeps for later, with their deliveries (acknowledged once used)."""

    rounds: dict[tuple[int, int, int], dict[int, tuple[Batch, object]]] = field(default_factory=dict)  # diloco
    later: list[tuple[Batch, object]] = field(default_factory=list)  # later rounds', come while we waited


class Worker:
    def __init__(self, settings: WorkerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.id = settings.worker_id or default_worker_id()
        pick_device(settings.device)  # a device this machine lacks is refused before joining
        self.shards_done = 0
        self.bytes_sent = 0
        self.rejected = 0  # malformed batches (the follower counts malformed parameters)
        self.stopping = False
        self.held = Held()  # batches kept for later

    @property
    def job(self) -> str:
        return self.settings.job

    def request_stop(self) -> None:
        """Graceful leave (SIGTERM): finish the shard in hand, then leave the job."""
        if not self.stopping:
            log.info("worker %s leaving after its current shard", self.id)
        self.stopping = True

    async def run(self) -> None:
        kernels.set_threads(self.settings.torch_threads)
        self.compute = kernels.compute_thread(self.settings.torch_threads)  # the kernels it reports
        spec = await wait_for_job_spec(self.bus, stopping=lambda: self.stopping)
        if spec is None:  # asked to leave before the job began
            return
        code_dir = await fetch_code(
            self.bus, [spec.model, spec.step, spec.task], self.settings.code_dir, self.settings.allow_pickled_code
        )
        self.replica = Replica(spec, self.settings, pick_device(self.settings.device), code_dir)
        self.params = ParamsFollower(self.bus, self.replica.layout.hash, self.replica.layout.numel, self.replica.load)
        durable = subjects.worker_consumer(self.id)
        self.batches = await self.bus.pull(
            "batches",
            subjects.batches(self.job, self.id),
            durable=durable,
            start_sequence=await self.bus.reclaim("batches", durable),  # a restart: what the last one held
            batch=4,
        )
        await self.params.subscribe(f"params-{self.id}", inactive_threshold=self.settings.member_ttl * 360)
        heartbeat = asyncio.create_task(self._heartbeat())
        log.info("worker %s joined job %s on %s", self.id, self.job, self.replica.device)
        try:
            await self._loop()
        finally:
            heartbeat.cancel()
            await self._leave()
            await self.params.close()
            self.compute.shutdown(wait=False)
        log.info("worker %s done: %d shards", self.id, self.shards_done)

    @property
    def spec(self):
        return self.replica.spec

    async def _read_params(self, until: tuple[int, int] | None, timeout: float = 1.0) -> None:
        await self.params.read(until, timeout, stop=lambda: self.stopping)

    async def _loop(self) -> None:
        checked = 0.0
        while not self.params.final and not self.stopping:
            if self.held.later:  # batches that came while we waited for parameters, oldest round first
                batch, delivery = self.held.later.pop(0)
            else:
                delivery = await self.batches.next(timeout=0.5)
                if delivery is None:
                    await self._read_params(until=None, timeout=0.05)
                    # Idle: is the job over?  (Unless the parameters just said so: a bucket that does
                    # not say it yet must not undo that.)
                    if not self.params.final and time.monotonic() - checked > 1.0:
                        checked = time.monotonic()
                        self.params.final = (
                            await self.bus.kv_get(subjects.job_bucket(self.job), subjects.JobKey.FINISHED) is not None
                        )
                    continue
                batch = await self._decode(delivery)
                if batch is None:
                    continue
            if not await self._handle(batch, delivery):
                return

    async def _decode(self, delivery) -> Batch | None:
        """The delivery's batch, or None when it is malformed or not ours (refused, counted, acked)."""
        try:
            batch = codec.decode(delivery.payload, Batch)
            if batch.worker != self.id or batch.job != self.job:
                raise codec.CodecError(f"batch for {batch.job}/{batch.worker}")
        except codec.CodecError as exc:
            self.rejected += 1
            log.warning("rejected (malformed): batch: %s", exc)
            await delivery.ack()
            return None
        return batch

    async def _handle(self, batch: Batch, delivery) -> bool:
        """Compute one batch (a diloco round: once all its batches are here) at its parameter
        version; False when the worker is leaving before that version came."""
        if self.spec.mode == "async":
            await self._async_batch(batch, delivery)
            return True
        if self.spec.mode == "diloco":  # even a round of one local step: a pseudo-gradient
            await self._drop_stale_held()
            ready = self._hold(batch, delivery)
            if ready is None:
                return True
            batches, deliveries = ready
        else:
            batches, deliveries = [batch], [delivery]
        need = (batch.generation, batch.round)
        await self._await_params(need, deliveries)
        if self.stopping and self.params.stamp < need:
            await self.batches.close()  # hands the batch back: the orchestrator re-issues it
            return False
        if self.params.stamp == need:
            await self._compute_and_publish(batches, deliveries)
        else:
            log.info("batch of round %s dropped: parameters are already at %s", need, self.params.stamp)
        for held in deliveries:
            await held.ack()
        return True

    async def _await_params(self, need: tuple[int, int], deliveries: list) -> None:
        """Wait for parameters `need`.  A round's batches come while the round before is still
        being reduced (it is planned ahead), so this can be a whole round; meanwhile a shard of
        the round in hand may be re-issued to us, and the round cannot end without it: every
        second, a batch that came is computed now if it is for the parameters we hold, and
        kept for later if not."""
        touched = time.monotonic()
        while self.params.stamp < need and not self.stopping and not self.params.final:
            until = time.monotonic() + 1.0
            await self.params.read(need, timeout=0.5, stop=lambda t=until: self.stopping or time.monotonic() > t)
            if self.params.stamp >= need or self.stopping or self.params.final:
                return
            if time.monotonic() - touched > 10.0:  # held this long: keep the server from redelivering them
                touched = time.monotonic()
                for held in [*deliveries, *(d for _, d in self.held.later)]:
                    await held.in_progress()
            delivery = await self.batches.next(timeout=0.01)
            batch = None if delivery is None else await self._decode(delivery)
            if batch is None:
                continue
            if (batch.generation, batch.round) <= self.params.stamp:
                await self._handle(batch, delivery)
            else:
                self.held.later.append((batch, delivery))
                self.held.later.sort(key=lambda held: (held[0].generation, held[0].round))

    def _hold(self, batch: Batch, delivery) -> tuple[list[Batch], list] | None:
        """diloco: keep a round's batches until all its local steps are here; then all of them, in order."""
        key = (batch.generation, batch.round, batch.shard)
        self.held.rounds.setdefault(key, {})[batch.inner] = (batch, delivery)
        if len(self.held.rounds[key]) < max(1, batch.inner_steps):
            return None
        steps = self.held.rounds.pop(key)
        ordered = [steps[h] for h in sorted(steps)]
        return [b for b, _ in ordered], [d for _, d in ordered]

    async def _drop_stale_held(self) -> None:
        """diloco: batches held for a round the parameters have moved past will never be used."""
        for key in [k for k in self.held.rounds if k[:2] < self.params.stamp]:
            for _, delivery in self.held.rounds.pop(key).values():
                await delivery.ack()

    async def _async_batch(self, batch: Batch, delivery) -> None:
        """async: compute on the newest parameters there are (the orchestrator judges staleness)."""
        await self._read_params(until=None, timeout=0.02)
        if self.params.stamp[0] < batch.generation:
            await self._read_params(until=(batch.generation, 0))
        if self.params.stamp[0] == batch.generation:
            await self._compute_and_publish([batch], [delivery])
        else:
            log.info("batch of generation %d dropped: parameters are at %s", batch.generation, self.params.stamp)
        await delivery.ack()

    async def _compute_and_publish(self, batches: list[Batch], deliveries: list) -> None:
        keepalive = asyncio.create_task(self._keep_in_progress(deliveries))
        try:
            loop = asyncio.get_running_loop()
            if self.spec.mode == "diloco":
                flat, loss, samples, count = await loop.run_in_executor(self.compute, self.replica.local_steps, batches)
            else:
                result = await loop.run_in_executor(self.compute, self.replica.gradient, batches[0])
                flat, loss, count = result.values, result.loss, result.count
                samples = batches[0].stop - batches[0].start
        finally:
            keepalive.cancel()
        batch = batches[0]
        parts = self.replica.parts(flat, self.bus.chunk_bytes)
        packed = self.replica.compress(flat, parts)

        def items():
            for (slice_, _, chunk, _), (values, scale, indices) in zip(parts, packed):
                msg = Gradient(
                    self.job,
                    self.id,
                    batch.round,
                    batch.shard,
                    samples,
                    loss,
                    self.params.stamp[1],
                    chunk,
                    values,
                    self.params.stamp[0],
                    self.spec.compression,
                    scale,
                    indices,
                    count=count,
                )
                # Per worker: a re-issued shard's chunks from its new worker must be stored even
                # where the first worker's were (the orchestrator counts each chunk once), or
                # a NaN gradient re-computed elsewhere would never arrive to prove divergence.
                msg_id = f"grad:{batch.generation}:{batch.round}:{batch.shard}:{slice_}:{chunk.index}:{self.id}"
                payload = codec.encode(msg)
                self.bytes_sent += len(payload)
                yield subjects.grads(self.job, slice_), payload, msg_id

        await self.bus.publish(items())
        self.shards_done += 1
        telemetry.SHARDS.inc()

    @staticmethod
    async def _keep_in_progress(deliveries: list, period: float = 10.0) -> None:
        """A long computation must not let the batches' ack wait expire (they would be redelivered)."""
        while True:
            await asyncio.sleep(period)
            for delivery in deliveries:
                await delivery.in_progress()

    # ------------------------------------------------------------------ membership

    async def _heartbeat(self) -> None:
        kv = await self.bus.kv(subjects.members_bucket(self.job), ttl=self.settings.member_ttl)
        k = kernels.current(self.replica.device.type)  # set before the first gradient, never changed after
        missed = 0
        while True:
            beat = Heartbeat(
                self.job,
                self.id,
                self.id,
                socket.gethostname(),
                os.getpid(),
                time.time(),
                self.shards_done,
                max(self.params.stamp[1], 0),
                self.bytes_sent,
                k.torch,
                k.threads,
                k.device,
                k.cpu,
                ready=self.params.stamp[1] >= 0,
                heartbeat_seconds=self.settings.heartbeat_seconds,
            )
            try:
                await kv.put(self.id, codec.encode(beat))
                if missed:
                    log.warning("heartbeats stored again after %d missed", missed)
                missed = 0
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next period
                if not missed:  # once per streak: a full store refuses every beat for as long as it is full
                    log.warning("heartbeat failed: %s (retried every %g s)", exc, self.settings.heartbeat_seconds)
                missed += 1
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _leave(self) -> None:
        try:
            kv = await self.bus.kv(subjects.members_bucket(self.job))
            await kv.delete(self.id)
        except Exception:  # noqa: BLE001 - the TTL removes us anyway
            pass
