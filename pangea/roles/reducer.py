"""An orchestrator shard: averages one slice of every round's gradient, for the orchestrator.

With `--shards S` the parameter vector is cut into S slices (`chunking.bounds`); workers
send slice s of their gradient to `pangea.<job>.grads.<s>`.  Slice 0 is the
orchestrator's own; shard s >= 1 (this role) follows the round plans, sums its slice over
the round's shards exactly as the orchestrator would (same checks, same float64
accumulator), and publishes the mean slice on `pangea.<job>.reduced`.
The orchestrator joins the slices, steps the optimizer and broadcasts as usual, so the
K-fold fan-in of gradient bytes is spread over S processes (cores, machines).

A shard holds no state beyond the round in hand.  It acknowledges a round's gradient
chunks only after its mean slice is stored on the bus, so a shard that dies and is
restarted gets them again (after the ack wait) and the round still completes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.client import Bus, ConsumerLost, Delivery
from pangea.errors import Reason, Rejected, SettingsError
from pangea.roles.gradients import GradientIntake
from pangea.roles.jobspec import wait_for_job_spec
from pangea.roles.slices import shard_name
from pangea.settings import ReducerSettings
from pangea.train.aggregate import RoundAccumulator, sums_on_wire
from pangea.wire import codec
from pangea.wire.chunking import bounds, split
from pangea.wire.messages import GRADIENT_TENSOR, Gradient, RoundPlan, Tensor

log = logging.getLogger(__name__)


@dataclass
class RoundInHand:
    """The round this shard is averaging: its plan, its sum so far, the chunks to acknowledge."""

    plan: RoundPlan
    acc: RoundAccumulator
    pending: list[Delivery] = field(default_factory=list)  # its chunks, acknowledged once its mean is stored
    sent: bool = False  # its mean slice is stored
    mean: np.ndarray | None = None  # once taken (a restarted server may need it stored again)

    @property
    def stamp(self) -> tuple[int, int]:
        return (self.plan.generation, self.plan.round)


class Reducer:
    def __init__(self, settings: ReducerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.rejected: Counter[str] = Counter()
        self.round: RoundInHand | None = None
        self.ahead: dict[tuple[int, int], RoundPlan] = {}  # plans made ahead of rounds not opened yet
        self.gradients: GradientIntake | None = None  # once the job's spec is read
        self.rounds_done = 0
        self.final = False

    @property
    def job(self) -> str:
        return self.settings.job

    @property
    def shard(self) -> int:
        return self.settings.shard

    @property
    def name(self) -> str:
        return shard_name(self.shard)

    async def run(self) -> None:
        spec = await wait_for_job_spec(self.bus)
        self.spec = spec
        shards = max(1, spec.shards)
        if self.shard >= shards:
            raise SettingsError(
                f"job {self.job!r} has {shards} orchestrator shard(s): --shard {self.shard} is not one of 1..{shards - 1}"
            )
        self.span = bounds(spec.num_params, shards, self.shard)
        self.gradients = GradientIntake(self.job, spec.compression, self.bus.max_payload, self._reject)
        durable = self.name
        self.plans = await self.bus.pull("plans", subjects.plans(self.job), durable=durable, batch=16)
        self.grads = await self.bus.pull(
            "grads", subjects.grads(self.job, self.shard), durable=durable, batch=256, chunked=True
        )
        log.info("orchestrator shard %d of job %s: averaging parameters [%d, %d)", self.shard, self.job, *self.span)
        while not self.final:
            try:
                delivery = await self.grads.next(timeout=0.2)
            except ConsumerLost as exc:
                await self._restore(str(exc))
                continue
            if delivery is None:
                await self._read_plans(timeout=0.05)  # idle: re-issues, a new generation, the end
                continue
            await self._intake(delivery)
            if self.round is not None and self.round.acc.complete and not self.round.sent:
                await self._publish()
        log.info(
            "orchestrator shard %d done: %d rounds, rejected %s", self.shard, self.rounds_done, dict(self.rejected)
        )

    async def _restore(self, why: str) -> None:
        """The server lost the gradient stream (it restarted, and keeps it in memory): consume it
        again once the orchestrator created it again.  The sum in hand keeps what it counted
        (the orchestrator asks its shards again: their copies are refused as duplicates), and a
        mean slice already stored is stored again (it was lost too)."""
        log.warning("%s: waiting for the orchestrator to create it again", why)
        await self.grads.reopen()
        if self.round is not None:
            self.round.pending = []  # their deliveries went with the stream
            if self.round.sent:
                await self._publish()

    async def _read_plans(self, timeout: float) -> None:
        """Apply the plans that arrived, waiting up to `timeout` for the first one.

        (Fetches shorter than a few ms can miss messages the server is about to deliver,
        so this is called when the plans matter, not on every gradient chunk.)"""
        while (delivery := await self.plans.next(timeout=timeout)) is not None:
            try:
                await self._follow(codec.decode(delivery.payload, RoundPlan))
            except codec.CodecError as exc:
                self._reject(Reason.MALFORMED, f"plan: {exc}")
            await delivery.ack()
            timeout = 0.05

    def _knows(self, grad: Gradient) -> bool:
        """Whether the plans read so far cover this chunk's round and sender."""
        stamp = (grad.generation, grad.round)
        return stamp < self._stamp() or (
            stamp == self._stamp() and grad.sender in self.gradients.assigned.get(grad.shard, ())
        )

    def _stamp(self) -> tuple[int, int]:
        return self.round.stamp if self.round else (-1, -1)

    async def _follow(self, plan: RoundPlan) -> None:
        if plan.final:
            self.final = True
            return
        stamp = (plan.generation, plan.round)
        if plan.ahead:  # the round opens with this plan when its first chunk comes
            if stamp > self._stamp():
                self.ahead[stamp] = plan
            return
        if stamp < self._stamp():
            return
        if stamp in self.ahead:  # a re-issue of a round planned ahead: open it first
            await self._open(self.ahead.pop(stamp))
        if stamp == self._stamp():  # a re-issue: more workers may now send these shards
            for s in plan.reissue:
                self.gradients.give(s, plan.shards[s].worker)
                self.gradients.late.add((plan.round, s))
            return
        await self._open(plan)

    async def _open(self, plan: RoundPlan) -> None:
        """Start averaging the round of `plan`."""
        stamp = (plan.generation, plan.round)
        self.ahead = {k: p for k, p in self.ahead.items() if k > stamp}
        await self._drop_pending()  # the previous round is closed (or abandoned by a new generation)
        lo, hi = self.span
        self.round = RoundInHand(
            plan,
            RoundAccumulator(
                plan.round,
                hi - lo,
                {i: s.size for i, s in enumerate(plan.shards)},
                # The slice's elements before the buffers (a spec older than param_numel says 0:
                # all of num_params, buffers included, as its writer's mean treated them).
                params_end=(self.spec.param_numel or self.spec.num_params) - lo,
                summed=sums_on_wire(self.spec.mode, self.spec.compression),
            ),
        )
        self.gradients.new_round(plan)

    async def _opens(self, grad: Gradient) -> bool:
        """Open the round of `grad` if it was planned ahead with a shard for its sender, once the
        round in hand is averaged (its workers had its parameters: ours is stored); True if so."""
        plan = self.ahead.get((grad.generation, grad.round))
        if plan is None or (self.round is not None and not self.round.sent):
            return False
        if grad.sender not in {s.worker for s in plan.shards}:
            return False
        await self._open(self.ahead.pop((grad.generation, grad.round)))
        return True

    async def _intake(self, delivery: Delivery) -> None:
        grad = self.gradients.decode(delivery.payload)
        if grad is not None:
            # A worker computes only after its plan is stored: if this chunk is news, the round
            # it opens was planned ahead, or its plan is on its way.
            if not self._knows(grad) and not await self._opens(grad):
                await self._read_plans(timeout=1.0)
                await self._opens(grad)
            if self.round is None:
                self.gradients.refuse(grad, Rejected(Reason.FUTURE_ROUND, f"round {grad.round} before any plan"))
            elif self.round.sent and grad.round == self.round.plan.round:
                self.gradients.refuse(grad, Rejected(Reason.DUPLICATE, f"round {grad.round} is already averaged"))
            else:
                plan = self.round.plan
                if self.gradients.add(plan, self.round.acc, grad, generation=plan.generation, members=()):
                    self.round.pending.append(delivery)  # acknowledged once the round's mean is stored
                    return
        await delivery.ack()

    async def _publish(self) -> None:
        plan, acc = self.round.plan, self.round.acc
        if self.round.mean is None:
            self.round.mean = acc.mean()
        mean = self.round.mean

        def items():
            for chunk, values in split(mean, self.bus.chunk_bytes):
                msg = Gradient(
                    self.job,
                    self.name,
                    plan.round,
                    self.shard,
                    acc.total_samples,
                    acc.loss(),
                    plan.round,
                    chunk,
                    Tensor.from_numpy(values, GRADIENT_TENSOR),
                    plan.generation,
                )
                yield (
                    subjects.reduced(self.job),
                    codec.encode(msg),
                    f"reduced:{plan.generation}:{plan.round}:{self.shard}:{chunk.index}",
                )

        await self.bus.publish(items())
        self.round.sent = True
        self.rounds_done += 1
        telemetry.ROUNDS.inc()
        pending, self.round.pending = self.round.pending, []
        for delivery in pending:
            await delivery.ack()

    async def _drop_pending(self) -> None:
        """Chunks of a round that will never be averaged here (a new generation took over)."""
        if self.round is None:
            return
        pending, self.round.pending = self.round.pending, []
        if pending:
            log.info("round %d abandoned with %d chunks in hand", self.round.plan.round, len(pending))
        for delivery in pending:
            await delivery.ack()

    def _reject(self, reason: str, detail: str) -> bool:
        self.rejected[reason] += 1
        telemetry.REJECTED.labels(reason).inc()
        log.warning("rejected (%s): %s", reason, detail)
        return False
