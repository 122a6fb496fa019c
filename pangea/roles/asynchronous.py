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

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.client import ConsumerLost
from pangea.errors import Diverged, Reason, Rejected
from pangea.roles import intake
from pangea.train.aggregate import sums_on_wire
from pangea.train.data import position
from pangea.train.plans import batch_rows
from pangea.train.training import learning_rates
from pangea.wire import codec
from pangea.wire.chunking import Assembler
from pangea.wire.messages import GRADIENT_TENSOR, Gradient, RoundDone, RoundPlan, Shard

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
        n, size = o.server.num_samples, o.settings.batch_size
        for r in range(o.server.total_rounds):
            self.epoch_left[position(r, n, size)[0]] += 1
        next_check = 0.0
        while len(self.resolved) < o.server.total_rounds:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                await self._membership()
            await self._fill()
            try:
                delivery = await o.inbox.grads.next(timeout=0.1)
            except ConsumerLost as exc:
                await self._restore_bus(str(exc))
                continue
            if delivery is None:
                continue
            done = self._intake(delivery)
            await delivery.ack()
            if done is not None:
                await self._apply(*done)

    async def _membership(self) -> None:
        o = self.o
        live = o.membership.plannable(await o.membership.live()) or await o.membership.wait(1)
        joined, left = sorted(set(live) - set(self.live)), sorted(set(self.live) - set(live))
        if self.live and joined:
            o.event(self.next_round, "join", f"joined: {', '.join(joined)}")
        if left:
            o.event(self.next_round, "leave", f"left: {', '.join(left)}")
        self.live = o.membership.known = live
        for worker in left:
            for r in sorted(self.in_hand.pop(worker, set())):
                if r not in self.resolved:
                    await self._give(r, self._least_busy(), why=f"{worker} left the job")

    async def _restore_bus(self, why: str) -> None:
        """The server lost the gradient and parameter streams (it restarted, and keeps them in
        memory): create them and the consumers again, publish the newest parameters again, and
        give every global batch in hand to its worker again (what it sent is gone)."""
        o = self.o
        await o.bus.restore_job_streams()
        await o.inbox.reopen()
        await o.publish_params(self.version)
        self.partial.clear()
        o.event(self.next_round, "restore", f"{why}: streams and parameters restored")
        for worker, rounds in sorted(self.in_hand.items()):
            for r in sorted(rounds - self.resolved):
                await self._give(r, worker, why="the server lost its gradient")

    def _least_busy(self) -> str:
        return min(self.live, key=lambda w: (len(self.in_hand.get(w, ())), w))

    async def _fill(self) -> None:
        """Give every live worker batches until it holds DEPTH."""
        while self.next_round < self.o.server.total_rounds and self.live:
            worker = self._least_busy()
            if len(self.in_hand.get(worker, ())) >= DEPTH:
                return
            await self._give(self.next_round, worker)
            self.next_round += 1

    async def _give(self, r: int, worker: str, why: str = "") -> None:
        o = self.o
        epoch, step = position(r, o.server.num_samples, o.settings.batch_size)
        rows = batch_rows(o.server.num_samples, o.settings.batch_size, step)
        attempt = self.attempts[r]
        self.attempts[r] += 1
        self.in_hand.setdefault(worker, set()).add(r)
        self.assigned.setdefault(r, set()).add(worker)
        if why:
            o.event(r, "reassign", f"global batch {r} ({why}) -> {worker}")
        await o.outbox.publish_plan(
            RoundPlan(
                o.job,
                "orchestrator",
                r,
                epoch,
                step,
                rows,
                (Shard(worker, 0, rows),),
                attempt=attempt,
                reissue=(0,) if attempt else (),
                generation=o.generation,
            )
        )

    def _intake(self, delivery) -> tuple[int, Gradient, np.ndarray] | None:
        """Check one chunk; (round, gradient, whole vector) once a sender's gradient is complete."""
        o = self.o
        grad = o.gradients.decode(delivery.payload)
        if grad is None:
            return None
        try:
            self._check(grad)
            values = intake.values(grad)
            if not np.isfinite(values).all() or not np.isfinite(grad.loss):
                raise Rejected(Reason.NON_FINITE, f"round {grad.round} chunk {grad.chunk.index} has NaN/Inf")
            part = self.partial.setdefault((grad.round, grad.sender), Assembler(o.server.layout.numel))
            try:
                part.add(grad.params_version, grad.chunk, values)
            except ValueError as exc:
                raise Rejected(Reason.WRONG_SHAPE, str(exc)) from None
        except Rejected as exc:
            o.reject(exc.reason, f"from {grad.sender!r}: {exc.detail}")
            return None
        if not part.complete:
            return None
        del self.partial[grad.round, grad.sender]
        return grad.round, grad, part.buffer

    def _check(self, grad: Gradient) -> None:
        o = self.o
        if grad.job != o.job:
            raise Rejected(Reason.WRONG_JOB, f"gradient for job {grad.job!r}")
        if grad.generation != o.generation:
            raise Rejected(Reason.STALE_GENERATION, f"generation {grad.generation}, current {o.generation}")
        if grad.sender not in self.assigned.get(grad.round, ()):
            if grad.round >= o.server.total_rounds or grad.round not in self.assigned:
                raise Rejected(Reason.FUTURE_ROUND, f"round {grad.round} was not given out")
            raise Rejected(Reason.NOT_THEIR_SHARD, f"global batch {grad.round} is not {grad.sender!r}'s")
        if grad.round in self.resolved:
            raise Rejected(Reason.STRAGGLER_LATE, f"global batch {grad.round} is already done")
        if grad.shard != 0:
            raise Rejected(Reason.UNKNOWN_SHARD, f"async global batches have one shard, got {grad.shard}")
        if grad.params_version > self.version:
            raise Rejected(Reason.FUTURE_PARAMS, f"computed on version {grad.params_version}, newest is {self.version}")
        if grad.values.name != GRADIENT_TENSOR:
            raise Rejected(Reason.WRONG_NAME, f"tensor {grad.values.name!r}, expected {GRADIENT_TENSOR!r}")
        if grad.compression != o.settings.compression:
            raise Rejected(Reason.WRONG_COMPRESSION, f"{grad.compression!r}, the job uses {o.settings.compression!r}")
        if grad.values.dtype != intake.WIRE_DTYPES[grad.compression]:
            raise Rejected(Reason.WRONG_DTYPE, f"{grad.values.dtype}, expected {intake.WIRE_DTYPES[grad.compression]}")
        rows = batch_rows(
            o.server.num_samples,
            o.settings.batch_size,
            position(grad.round, o.server.num_samples, o.settings.batch_size)[1],
        )
        if grad.num_samples != rows:
            raise Rejected(
                Reason.WRONG_SAMPLES, f"global batch {grad.round} has {rows} samples, got {grad.num_samples}"
            )
        if not (np.isfinite(grad.count) and grad.count >= 0):
            raise Rejected(Reason.WRONG_SAMPLES, f"global batch {grad.round} claims {grad.count} counted targets")

    async def _apply(self, r: int, grad: Gradient, flat: np.ndarray) -> None:
        o = self.o
        tau = self.version - grad.params_version
        for holder in self.assigned[r]:
            self.in_hand.get(holder, set()).discard(r)
        self.resolved.add(r)
        if tau > o.settings.staleness:
            o.reject(
                Reason.TOO_STALE,
                f"global batch {r} from {grad.sender!r} is {tau} updates old (bound {o.settings.staleness})",
            )
            samples = 0
        else:
            self.staleness[tau] += 1
            # Buffers as the worker left them; the gradient of the loss sum over its count, scaled.
            update = np.array(flat, dtype=np.float32)
            scale = staleness_weight(tau)
            if sums_on_wire(o.settings.mode, o.settings.compression):  # the loss sum's gradient: over its count
                scale = scale / grad.count if grad.count > 0 else 0.0
            update[: o.server.layout.param_numel] *= np.float32(scale)
            o.server.step(update, self.version)
            if not all(bool(p.isfinite().all()) for p in o.server.layout.params(o.server.model)):
                raise Diverged(
                    f"training diverged at global batch {r}: the parameters are no longer finite (lower --lr)"
                )
            self.version += 1
            await o.publish_params(self.version)
            samples = grad.num_samples
        await self._record(r, grad, samples)

    async def _record(self, r: int, grad: Gradient, samples: int) -> None:
        o = self.o
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        epoch = position(r, o.server.num_samples, o.settings.batch_size)[0]
        self.epoch_left[epoch] -= 1
        figure, evaluated = float("nan"), False
        if self.epoch_left[epoch] == 0:
            figures = o.server.evaluate()
            o.metrics.add_evaluation(len(self.resolved) - 1, figures, 1)
            figure, evaluated = figures.get(o.server.task.headline, float("nan")), True
            log.info(
                "epoch %d done (%d/%d global batches, version %d): %s %.4f",
                epoch + 1,
                len(self.resolved),
                o.server.total_rounds,
                self.version,
                o.server.task.headline,
                figure,
            )
        o.metrics.loss.append(grad.loss)
        o.metrics.round_seconds.append(seconds)
        o.metrics.samples.append(samples)
        o.metrics.workers.append(len(self.live))
        step = len(self.resolved) - 1
        lrs = learning_rates(o.server.optimizer)
        o.outbox.events.add_round(
            step, loss=grad.loss, lrs=lrs, samples=samples, seconds=seconds, workers=len(self.live)
        )
        if evaluated:
            o.outbox.events.add_evaluation(step, o.metrics.final)
        o.metrics.staleness = {str(k): v for k, v in sorted(self.staleness.items())}
        telemetry.ROUNDS.inc()
        telemetry.SAMPLES.inc(samples)
        telemetry.LOSS.set(grad.loss)
        done = RoundDone(
            o.job,
            "orchestrator",
            len(self.resolved) - 1,
            o.server.total_rounds,
            epoch,
            grad.loss,
            seconds,
            samples,
            figure,
            tuple(self.live),
            tuple(o.metrics.round_seconds[-20:]),
            figure=o.server.task.headline,
            targets_per_sample=o.server.data.targets_per_sample,
        )
        payload = codec.encode(done)
        await o.bus.publish_event(subjects.rounds(o.job), payload)
        await o.bus.kv_put(subjects.job_bucket(o.job), subjects.JobKey.ROUND, payload)
