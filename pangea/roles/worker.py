"""A worker: pulls its shards, computes gradients at the matching parameter version, publishes.

Joining is subscribing: the worker creates its batch consumer, reads the latest
parameters, then announces itself with a heartbeat; the orchestrator plans it in from the
next round.  For each batch of round r it needs parameters version r exactly: an older
version is waited for, a newer one means the round is over and the batch is dropped.
Versions are compared as (generation, version): a restarted orchestrator starts a new
generation, which may go back to the round of its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import numpy as np
import torch

from pangea import codec, diloco, telemetry
from pangea.bus import subjects
from pangea.bus.client import Bus, BusError, Puller
from pangea.chunking import Assembler, bounds, split
from pangea.compress import ErrorFeedback
from pangea.layout import Layout
from pangea.messages import GRADIENT_TENSOR, Batch, Chunk, Gradient, Heartbeat, Params, Tensor
from pangea.models import build_model
from pangea.roles.jobspec import wait_for_job_spec
from pangea.settings import WorkerSettings
from pangea.training import loss_fn

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BusError("--device cuda requested but torch sees no CUDA device")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class Worker:
    def __init__(self, settings: WorkerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.job = settings.job
        self.id = settings.worker_id or default_worker_id()
        self.device = pick_device(settings.device)
        self.shards_done = 0
        self.rejected = 0
        self.stamp = (-1, -1)  # (generation, version) of the parameters in the model
        self.final = False
        self.stopping = False
        self.held: dict[tuple[int, int, int], dict[int, tuple[Batch, object]]] = {}  # diloco: a round's batches
        self.bytes_sent = 0

    def request_stop(self) -> None:
        """Graceful leave (SIGTERM): finish the shard in hand, then leave the job."""
        if not self.stopping:
            log.info("worker %s leaving after its current shard", self.id)
        self.stopping = True

    async def run(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        spec = await wait_for_job_spec(self.bus)
        self.spec = spec
        self.feedback: ErrorFeedback | None = None  # lossy compression: what was not sent yet
        self.model = build_model(spec.model, spec.input_shape, spec.num_classes, spec.hidden, spec.seed).to(self.device)
        self.model.train()
        self.layout = Layout.of(self.model)
        if self.layout.hash != spec.layout_hash:
            raise BusError(f"model {spec.model} builds a different layout here than on the orchestrator")
        self.params = Assembler(self.layout.numel)
        self.batches = await self.bus.pull(
            "batches", subjects.batches(self.job, self.id), durable=subjects.worker_consumer(self.id), batch=4
        )
        self.params_in = await self._params_consumer()
        if spec.mode == "diloco":  # the first optimizer torch builds takes seconds: not in round 0
            diloco.inner_optimizer(spec.inner_optimizer, spec.inner_lr, self.layout.params(self.model))
        heartbeat = asyncio.create_task(self._heartbeat())
        log.info("worker %s joined job %s on %s", self.id, self.job, self.device)
        try:
            await self._loop()
        finally:
            heartbeat.cancel()
            await self._leave()
            await self.params_in.close()
        log.info("worker %s done: %d shards", self.id, self.shards_done)

    async def _loop(self) -> None:
        checked = 0.0
        while not self.final and not self.stopping:
            delivery = await self.batches.next(timeout=0.5)
            if delivery is None:
                await self._read_params(until=None, timeout=0.05)
                if time.monotonic() - checked > 1.0:  # idle: is the job over?
                    checked = time.monotonic()
                    self.final = await self.bus.kv_get(subjects.job_bucket(self.job), "finished") is not None
                continue
            try:
                batch = codec.decode(delivery.payload, Batch)
                if batch.worker != self.id or batch.job != self.job:
                    raise codec.CodecError(f"batch for {batch.job}/{batch.worker}")
            except codec.CodecError as exc:
                self.rejected += 1
                log.warning("rejected (malformed): batch: %s", exc)
                await delivery.ack()
                continue
            if self.spec.mode == "async":
                await self._async_batch(batch, delivery)
                continue
            if self.spec.mode == "diloco":  # even a round of one local step: a pseudo-gradient
                await self._drop_stale_held()
                ready = self._hold(batch, delivery)
                if ready is None:
                    continue
                batches, deliveries = ready
            else:
                batches, deliveries = [batch], [delivery]
            need = (batch.generation, batch.round)
            await self._read_params(until=need)
            if self.stopping and self.stamp < need:
                await self.batches.close()  # hands the batch back: the orchestrator re-issues it
                return
            if self.stamp == need:
                await self._compute_and_publish(batches, deliveries)
            else:
                log.info("batch of round %s dropped: parameters are already at %s", need, self.stamp)
            for held in deliveries:
                await held.ack()

    def _hold(self, batch: Batch, delivery) -> tuple[list[Batch], list] | None:
        """diloco: keep a round's batches until all its local steps are here; then all of them, in order."""
        key = (batch.generation, batch.round, batch.shard)
        self.held.setdefault(key, {})[batch.inner] = (batch, delivery)
        if len(self.held[key]) < max(1, batch.inner_steps):
            return None
        steps = self.held.pop(key)
        ordered = [steps[h] for h in sorted(steps)]
        return [b for b, _ in ordered], [d for _, d in ordered]

    async def _drop_stale_held(self) -> None:
        """diloco: batches held for a round the parameters have moved past will never be used."""
        for key in [k for k in self.held if k[:2] < self.stamp]:
            for _, delivery in self.held.pop(key).values():
                await delivery.ack()

    async def _async_batch(self, batch: Batch, delivery) -> None:
        """async: compute on the newest parameters there are (the orchestrator judges staleness)."""
        await self._read_params(until=None, timeout=0.02)
        if self.stamp[0] < batch.generation:
            await self._read_params(until=(batch.generation, 0))
        if self.stamp[0] == batch.generation:
            await self._compute_and_publish([batch], [delivery])
        else:
            log.info("batch of generation %d dropped: parameters are at %s", batch.generation, self.stamp)
        await delivery.ack()

    async def _compute_and_publish(self, batches: list[Batch], deliveries: list) -> None:
        keepalive = asyncio.create_task(self._keep_in_progress(deliveries))
        try:
            if self.spec.mode == "diloco":
                flat, loss, samples = await asyncio.to_thread(self._local_steps, batches)
            else:
                flat, loss = await asyncio.to_thread(self._gradient, batches[0])
                samples = batches[0].stop - batches[0].start
        finally:
            keepalive.cancel()
        batch = batches[0]
        parts = self._parts(flat)
        packed = self._compress(flat, parts)

        def items():
            for (slice_, lo, chunk, _), (values, scale, indices) in zip(parts, packed):
                msg = Gradient(
                    self.job, self.id, batch.round, batch.shard, samples, loss,
                    self.stamp[1], chunk, values, self.stamp[0], self.spec.compression, scale, indices,
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

    def _parts(self, flat: np.ndarray) -> list[tuple[int, int, Chunk, np.ndarray]]:
        """(slice, slice start, chunk within the slice, values) covering the gradient.

        Slice s of the vector goes to orchestrator shard s, chunked within the slice.  The
        orchestrator's own slice 0 comes last: once it holds a shard's slice, the other
        shards (almost always) hold theirs.
        """
        shards = max(1, self.spec.shards)
        parts = []
        for slice_ in reversed(range(shards)):
            lo, hi = bounds(flat.shape[0], shards, slice_)
            parts += [(slice_, lo, chunk, values) for chunk, values in split(flat[lo:hi], self.bus.chunk_bytes)]
        return parts

    def _compress(self, flat: np.ndarray, parts: list) -> list[tuple[Tensor, float, Tensor]]:
        """(values, scale, indices) per chunk, compressed as the job says, with error feedback."""
        none = Tensor("uint32", (0,), memoryview(b""))
        if self.spec.compression == "none":
            return [(Tensor.from_numpy(values, GRADIENT_TENSOR), 1.0, none) for *_, values in parts]
        if self.feedback is None:
            self.feedback = ErrorFeedback(self.spec.compression, self.spec.topk_fraction)
        slices = [(lo + c.offset, lo + c.offset + v.shape[0]) for _, lo, c, v in parts]
        out = []
        for c in self.feedback.compress_slices(flat, slices):
            if c.kind == "bf16":
                values = Tensor("bfloat16", c.values.shape, memoryview(c.values).cast("B"), GRADIENT_TENSOR)
            else:
                values = Tensor.from_numpy(c.values, GRADIENT_TENSOR)
            indices = Tensor.from_numpy(c.indices) if c.indices is not None else none
            out.append((values, c.scale, indices))
        return out

    @staticmethod
    async def _keep_in_progress(deliveries: list, period: float = 10.0) -> None:
        """A long computation must not let the batches' ack wait expire (they would be redelivered)."""
        while True:
            await asyncio.sleep(period)
            for delivery in deliveries:
                await delivery.in_progress()

    def _local_steps(self, batches: list[Batch]) -> tuple[np.ndarray, float, int]:
        """diloco: the round's inner steps from the round's parameters; the pseudo-gradient."""
        if self.settings.test_delay:
            time.sleep(self.settings.test_delay)
        data = [(b.x.torch().to(self.device), b.y.torch().to(self.device)) for b in batches]
        spec = self.spec
        return diloco.local_steps(self.model, self.layout, self.start, data, spec.inner_optimizer, spec.inner_lr)

    def _gradient(self, batch: Batch) -> tuple[np.ndarray, float]:
        if self.settings.test_delay:
            time.sleep(self.settings.test_delay)
        x = batch.x.torch().to(self.device)
        y = batch.y.torch().to(self.device)
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y)
        loss.backward()
        flat = self.layout.flatten_grads(self.model)
        if self.settings.test_attack == "scale":  # test only: a poisoned gradient
            flat = flat * -20.0
        elif self.settings.test_attack == "random":
            flat = np.random.default_rng().normal(scale=10.0, size=flat.shape).astype(np.float32)
        return flat, loss.item()

    # ------------------------------------------------------------------ parameters

    async def _params_consumer(self) -> Puller:
        """Read parameters from two versions' worth of chunks before the last stored one.

        A retried publish can store a version's chunks out of order, but never a chunk of
        version v after version v+1 began; so two versions back covers the latest whole one.
        """
        subject = subjects.params(self.job)
        last = await self.bus.last_sequence_and_payload("params", subject)
        start = None
        if last is not None:
            seq, raw = last
            try:
                start = max(1, seq - 2 * codec.decode(raw, Params).chunk.count + 1)
            except codec.CodecError:
                start = None
        # Durable (so it is replicated with the stream and survives losing a cluster node),
        # removed by the server once the worker is gone for a while.
        return await self.bus.pull(
            "params", subject, durable=f"params-{self.id}", start_sequence=start, batch=256,
            inactive_threshold=self.settings.member_ttl * 360,
        )

    async def _read_params(self, until: tuple[int, int] | None, timeout: float = 1.0) -> None:
        """Apply parameter versions as they complete; with `until`, wait until the stamp reaches it."""
        waited = time.monotonic()
        while until is None or self.stamp < until:
            if self.stopping and until is not None:
                return
            delivery = await self.params_in.next(timeout=timeout)
            if delivery is None:
                if until is None:
                    return
                if time.monotonic() - waited > 30:
                    log.info("still waiting for parameters %s (have %s)", until, self.stamp)
                    waited = time.monotonic()
                continue
            try:
                params = codec.decode(delivery.payload, Params)
                if params.layout_hash != self.layout.hash:
                    raise codec.CodecError("parameters of another model layout")
                stamp = (params.generation, params.version)
                if stamp > self.stamp:
                    self.params.add(stamp, params.chunk, params.values.numpy())
            except (codec.CodecError, ValueError) as exc:
                self.rejected += 1
                log.warning("rejected (malformed): params: %s", exc)
            else:
                if self.params.complete and self.params.version > self.stamp:
                    self.layout.load_params(self.model, self.params.buffer)
                    if self.spec.mode == "diloco":  # local steps move the model: keep the start
                        self.start = self.params.buffer.copy()
                    self.stamp = self.params.version
                    self.final = params.final
            await delivery.ack()
            if self.final:
                return

    # ------------------------------------------------------------------ membership

    async def _heartbeat(self) -> None:
        kv = await self.bus.kv(subjects.members_bucket(self.job), ttl=self.settings.member_ttl)
        while True:
            beat = Heartbeat(
                self.job, self.id, self.id, socket.gethostname(), os.getpid(), time.time(),
                self.shards_done, max(self.stamp[1], 0), self.bytes_sent,
            )
            try:
                await kv.put(self.id, codec.encode(beat))
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next period
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _leave(self) -> None:
        try:
            kv = await self.bus.kv(subjects.members_bucket(self.job))
            await kv.delete(self.id)
        except Exception:  # noqa: BLE001 - the TTL removes us anyway
            pass
