"""`--mode async`: the orchestrator applies each gradient as it arrives, within a staleness bound.

Global batch r (the same sequence as sync) goes whole to one worker; every live worker
keeps up to DEPTH batches in hand, so none waits for the others.  A worker computes on
the newest parameters it has and says which version that was.  On arrival, the
gradient's staleness is tau = (updates applied since that version):
  tau <= s (PANGEA_STALENESS): applied at once, scaled by 1 / (1 + tau), as one step;
  tau >  s: refused and counted as `too_stale` (its samples are not trained on).
Every applied gradient makes a new parameter version, broadcast at once.

Not exact by nature (the order of updates depends on timing): tests check convergence
and the accounting.  A worker that leaves has its batches in hand given to another.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from pangea import codec, telemetry
from pangea.aggregate import Rejected
from pangea.bus import subjects
from pangea.chunking import Assembler
from pangea.data import position
from pangea.messages import GRADIENT_TENSOR, Gradient, RoundDone, RoundPlan, Shard
from pangea.roles import intake
from pangea.training import Diverged, batch_rows, evaluate

if TYPE_CHECKING:
    from pangea.roles.orchestrator import Orchestrator

log = logging.getLogger(__name__)
DEPTH = 2  # global batches a worker holds: one it computes, one queued


def staleness_weight(tau: int) -> float:
    """How much a gradient `tau` updates old counts: 1 when fresh, less the older it is."""
    return 1.0 / (1.0 + tau)


class AsyncTrainer:
    def __init__(self, orch: Orchestrator) -> None:
        self.o = orch
        self.version = 0  # parameter versions published: one per applied gradient
        self.in_hand: dict[str, set[int]] = {}  # worker -> rounds it holds
        self.assigned: dict[int, set[str]] = {}  # round -> every worker it was given
        self.attempts: Counter[int] = Counter()
        self.partial: dict[tuple[int, str], Assembler] = {}  # (round, sender) -> chunks so far
        self.next_round = 0
        self.resolved: set[int] = set()
        self.epoch_left: Counter[int] = Counter()
        self.staleness: Counter[int] = Counter()
        self.live: list[str] = []
        self._last = time.perf_counter()

    async def run(self) -> None:
        o = self.o
        n, size = o.num_samples, o.settings.batch_size
        for r in range(o.total_rounds):
            self.epoch_left[position(r, n, size)[0]] += 1
        next_check = 0.0
        while len(self.resolved) < o.total_rounds:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                await self._membership()
            await self._fill()
            delivery = await o._grads.next(timeout=0.1)
            if delivery is None:
                continue
            done = self._intake(delivery)
            await delivery.ack()
            if done is not None:
                await self._apply(*done)

    async def _membership(self) -> None:
        o = self.o
        live = await o.members() or await o.wait_for_members(1)
        joined, left = sorted(set(live) - set(self.live)), sorted(set(self.live) - set(live))
        if self.live and joined:
            o._event(self.next_round, "join", f"joined: {', '.join(joined)}")
        if left:
            o._event(self.next_round, "leave", f"left: {', '.join(left)}")
        self.live = o.known_members = live
        for worker in left:
            for r in sorted(self.in_hand.pop(worker, set())):
                if r not in self.resolved:
                    await self._give(r, self._least_busy(), why=f"{worker} left the job")

    def _least_busy(self) -> str:
        return min(self.live, key=lambda w: (len(self.in_hand.get(w, ())), w))

    async def _fill(self) -> None:
        """Give every live worker batches until it holds DEPTH."""
        while self.next_round < self.o.total_rounds and self.live:
            worker = self._least_busy()
            if len(self.in_hand.get(worker, ())) >= DEPTH:
                return
            await self._give(self.next_round, worker)
            self.next_round += 1

    async def _give(self, r: int, worker: str, why: str = "") -> None:
        o = self.o
        epoch, step = position(r, o.num_samples, o.settings.batch_size)
        rows = batch_rows(o.num_samples, o.settings.batch_size, step)
        attempt = self.attempts[r]
        self.attempts[r] += 1
        self.in_hand.setdefault(worker, set()).add(r)
        self.assigned.setdefault(r, set()).add(worker)
        if why:
            o._event(r, "reassign", f"global batch {r} ({why}) -> {worker}")
        await o.publish_plan(RoundPlan(
            o.job, "orchestrator", r, epoch, step, rows, (Shard(worker, 0, rows),), attempt=attempt,
            reissue=(0,) if attempt else (), generation=o.generation,
        ))

    def _intake(self, delivery) -> tuple[int, Gradient, np.ndarray] | None:
        """Check one chunk; (round, gradient, whole vector) once a sender's gradient is complete."""
        o = self.o
        if len(delivery.payload) > o.bus.max_payload:
            o._reject("oversized", f"{len(delivery.payload)} bytes on the gradient subject")
            return None
        try:
            grad = codec.decode(delivery.payload, Gradient)
        except codec.CodecError as exc:
            o._reject(exc.reason, str(exc))
            return None
        try:
            self._check(grad)
            values = intake.values(grad)
            if not np.isfinite(values).all() or not np.isfinite(grad.loss):
                raise Rejected("non_finite", f"round {grad.round} chunk {grad.chunk.index} has NaN/Inf")
            part = self.partial.setdefault((grad.round, grad.sender), Assembler(o.layout.numel))
            try:
                part.add(grad.params_version, grad.chunk, values)
            except ValueError as exc:
                raise Rejected("wrong_shape", str(exc)) from None
        except Rejected as exc:
            o._reject(exc.reason, f"from {grad.sender!r}: {exc.detail}")
            return None
        if not part.complete:
            return None
        del self.partial[grad.round, grad.sender]
        return grad.round, grad, part.buffer

    def _check(self, grad: Gradient) -> None:
        o = self.o
        if grad.job != o.job:
            raise Rejected("wrong_job", f"gradient for job {grad.job!r}")
        if grad.generation != o.generation:
            raise Rejected("stale_generation", f"generation {grad.generation}, current {o.generation}")
        if grad.sender not in self.assigned.get(grad.round, ()):
            if grad.round >= o.total_rounds or grad.round not in self.assigned:
                raise Rejected("future_round", f"round {grad.round} was not given out")
            raise Rejected("not_their_shard", f"global batch {grad.round} is not {grad.sender!r}'s")
        if grad.round in self.resolved:
            raise Rejected("straggler_late", f"global batch {grad.round} is already done")
        if grad.shard != 0:
            raise Rejected("unknown_shard", f"async global batches have one shard, got {grad.shard}")
        if grad.params_version > self.version:
            raise Rejected("future_params", f"computed on version {grad.params_version}, newest is {self.version}")
        if grad.values.name != GRADIENT_TENSOR:
            raise Rejected("wrong_name", f"tensor {grad.values.name!r}, expected {GRADIENT_TENSOR!r}")
        if grad.compression != o.settings.compression:
            raise Rejected("wrong_compression", f"{grad.compression!r}, the job uses {o.settings.compression!r}")
        if grad.values.dtype != intake.WIRE_DTYPES[grad.compression]:
            raise Rejected("wrong_dtype", f"{grad.values.dtype}, expected {intake.WIRE_DTYPES[grad.compression]}")
        rows = batch_rows(o.num_samples, o.settings.batch_size, position(grad.round, o.num_samples, o.settings.batch_size)[1])
        if grad.num_samples != rows:
            raise Rejected("wrong_samples", f"global batch {grad.round} has {rows} samples, got {grad.num_samples}")

    async def _apply(self, r: int, grad: Gradient, flat: np.ndarray) -> None:
        o = self.o
        tau = self.version - grad.params_version
        for holder in self.assigned[r]:
            self.in_hand.get(holder, set()).discard(r)
        self.resolved.add(r)
        if tau > o.settings.staleness:
            o._reject("too_stale", f"global batch {r} from {grad.sender!r} is {tau} updates old (bound {o.settings.staleness})")
            samples = 0
        else:
            self.staleness[tau] += 1
            o.layout.set_grads(o.model, flat * np.float32(staleness_weight(tau)))
            o.optimizer.step()
            if not all(bool(p.isfinite().all()) for p in o.layout.params(o.model)):
                raise Diverged(f"training diverged at global batch {r}: the parameters are no longer finite (lower --lr)")
            self.version += 1
            await o.publish_params(self.version)
            samples = grad.num_samples
        await self._record(r, grad, samples)

    async def _record(self, r: int, grad: Gradient, samples: int) -> None:
        o = self.o
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        epoch = position(r, o.num_samples, o.settings.batch_size)[0]
        self.epoch_left[epoch] -= 1
        accuracy = float("nan")
        if self.epoch_left[epoch] == 0:
            accuracy = evaluate(o.model, o.dataset.x_test, o.dataset.y_test)
            o.metrics.test_accuracy.append(accuracy)
            log.info("epoch %d done (%d/%d global batches, version %d): test accuracy %.4f",
                     epoch + 1, len(self.resolved), o.total_rounds, self.version, accuracy)
        o.metrics.loss.append(grad.loss)
        o.metrics.round_seconds.append(seconds)
        o.metrics.samples.append(samples)
        o.metrics.workers.append(len(self.live))
        o.metrics.staleness = {str(k): v for k, v in sorted(self.staleness.items())}
        telemetry.ROUNDS.inc()
        telemetry.SAMPLES.inc(samples)
        telemetry.LOSS.set(grad.loss)
        done = RoundDone(o.job, "orchestrator", len(self.resolved) - 1, o.total_rounds, epoch, grad.loss, seconds,
                         samples, accuracy, tuple(self.live), tuple(o.metrics.round_seconds[-20:]))
        payload = codec.encode(done)
        await o.bus.publish_event(subjects.rounds(o.job), payload)
        await o.bus.kv_put(subjects.job_bucket(o.job), "round", payload)
