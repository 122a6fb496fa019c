"""An orchestrator shard: averages one slice of every round's gradient, for the orchestrator.

With `--shards S` the parameter vector is cut into S slices (`chunking.bounds`); workers
send slice s of their gradient to `pangea.<job>.grads.<s>`.  Slice 0 is the
orchestrator's own; shard s >= 1 (this role) follows the round plans, sums its slice over
the round's shards exactly as the orchestrator would (same checks, same float64
accumulator), and publishes the sample-weighted mean slice on `pangea.<job>.reduced`.
The orchestrator joins the slices, steps the optimizer and broadcasts as usual, so the
K-fold fan-in of gradient bytes is spread over S processes (cores, machines).

A shard holds no state beyond the round in hand.  It acknowledges a round's gradient
chunks only after its mean slice is stored on the bus, so a shard that dies and is
restarted gets them again (after the ack wait) and the round still completes.
"""

from __future__ import annotations

import logging
from collections import Counter

from pangea import codec, telemetry
from pangea.aggregate import Rejected, RoundAccumulator
from pangea.bus import subjects
from pangea.bus.client import Bus, BusError, Delivery
from pangea.chunking import bounds, split
from pangea.messages import GRADIENT_TENSOR, Gradient, RoundPlan, Tensor
from pangea.roles import intake
from pangea.roles.jobspec import wait_for_job_spec
from pangea.roles.slices import shard_name
from pangea.settings import ReducerSettings

log = logging.getLogger(__name__)


class Reducer:
    def __init__(self, settings: ReducerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.job = settings.job
        self.shard = settings.shard
        self.name = shard_name(self.shard)
        self.rejected: Counter[str] = Counter()
        self.plan: RoundPlan | None = None
        self.acc: RoundAccumulator | None = None
        self.assigned: dict[int, set[str]] = {}
        self.late: set[tuple[int, int]] = set()
        self.pending: list[Delivery] = []  # this round's chunks, acknowledged once its mean is stored
        self.sent = False
        self.rounds_done = 0
        self.final = False

    async def run(self) -> None:
        spec = await wait_for_job_spec(self.bus)
        self.spec = spec
        shards = max(1, spec.shards)
        if self.shard >= shards:
            raise BusError(
                f"job {self.job!r} has {shards} orchestrator shard(s): --shard {self.shard} is not one of 1..{shards - 1}"
            )
        self.lo, self.hi = bounds(spec.num_params, shards, self.shard)
        durable = self.name
        self.plans = await self.bus.pull("plans", subjects.plans(self.job), durable=durable, batch=16)
        self.grads = await self.bus.pull("grads", subjects.grads(self.job, self.shard), durable=durable, batch=256)
        log.info("orchestrator shard %d of job %s: averaging parameters [%d, %d)", self.shard, self.job, self.lo, self.hi)
        while not self.final:
            delivery = await self.grads.next(timeout=0.2)
            if delivery is None:
                await self._read_plans(timeout=0.05)  # idle: re-issues, a new generation, the end
                continue
            await self._intake(delivery)
            if self.acc is not None and self.acc.complete and not self.sent:
                await self._publish()
        log.info("orchestrator shard %d done: %d rounds, rejected %s", self.shard, self.rounds_done, dict(self.rejected))

    async def _read_plans(self, timeout: float) -> None:
        """Apply the plans that arrived, waiting up to `timeout` for the first one.

        (Fetches shorter than a few ms can miss messages the server is about to deliver,
        so this is called when the plans matter, not on every gradient chunk.)"""
        while (delivery := await self.plans.next(timeout=timeout)) is not None:
            try:
                await self._follow(codec.decode(delivery.payload, RoundPlan))
            except codec.CodecError as exc:
                self._reject("malformed", f"plan: {exc}")
            await delivery.ack()
            timeout = 0.05

    def _knows(self, grad: Gradient) -> bool:
        """Whether the plans read so far cover this chunk's round and sender."""
        stamp = (grad.generation, grad.round)
        return stamp < self._stamp() or (stamp == self._stamp() and grad.sender in self.assigned.get(grad.shard, ()))

    def _stamp(self) -> tuple[int, int]:
        return (self.plan.generation, self.plan.round) if self.plan else (-1, -1)

    async def _follow(self, plan: RoundPlan) -> None:
        if plan.final:
            self.final = True
            return
        stamp = (plan.generation, plan.round)
        if stamp < self._stamp():
            return
        if stamp == self._stamp():  # a re-issue: more workers may now send these shards
            for s in plan.reissue:
                self.assigned[s].add(plan.shards[s].worker)
                self.late.add((plan.round, s))
            return
        await self._drop_pending()  # the previous round is closed (or abandoned by a new generation)
        self.plan = plan
        self.acc = RoundAccumulator(plan.round, self.hi - self.lo, {i: s.size for i, s in enumerate(plan.shards)})
        self.assigned = {i: {s.worker} for i, s in enumerate(plan.shards)}
        self.sent = False

    async def _intake(self, delivery: Delivery) -> None:
        if len(delivery.payload) > self.bus.max_payload:
            self._reject("oversized", f"{len(delivery.payload)} bytes on the gradient subject")
            await delivery.ack()
            return
        try:
            grad = codec.decode(delivery.payload, Gradient)
        except codec.CodecError as exc:
            self._reject(exc.reason, str(exc))
            await delivery.ack()
            return
        # A worker computes only after its plan is stored: if this chunk is news, read the plans.
        if not self._knows(grad):
            await self._read_plans(timeout=1.0)
        try:
            if self.plan is None:
                raise Rejected("future_round", f"round {grad.round} before any plan")
            if self.sent and grad.round == self.plan.round:
                raise Rejected("duplicate", f"round {grad.round} is already averaged")
            intake.check(
                grad, self.plan, job=self.job, generation=self.plan.generation, compression=self.spec.compression,
                assigned=self.assigned, members=(), late=self.late,
            )
            self.acc.add(grad.shard, grad.num_samples, grad.loss, grad.chunk, intake.values(grad))
        except Rejected as exc:
            if exc.reason == "duplicate" and (grad.round, grad.shard) in self.late:
                exc.reason = "straggler_late"  # a re-issued shard's second copy: expected
            self._reject(exc.reason, f"from {grad.sender!r}: {exc.detail}")
            await delivery.ack()
            return
        self.pending.append(delivery)

    async def _publish(self) -> None:
        plan, acc = self.plan, self.acc
        mean = acc.mean()

        def items():
            for chunk, values in split(mean, self.bus.chunk_bytes):
                msg = Gradient(
                    self.job, self.name, plan.round, self.shard, acc.total_samples, acc.loss(), plan.round,
                    chunk, Tensor.from_numpy(values, GRADIENT_TENSOR), plan.generation,
                )
                yield subjects.reduced(self.job), codec.encode(msg), f"reduced:{plan.generation}:{plan.round}:{self.shard}:{chunk.index}"

        await self.bus.publish(items())
        self.sent = True
        self.rounds_done += 1
        telemetry.ROUNDS.inc()
        for delivery in self.pending:
            await delivery.ack()
        self.pending = []

    async def _drop_pending(self) -> None:
        """Chunks of a round that will never be averaged here (a new generation took over)."""
        if self.pending:
            log.info("round %d abandoned with %d chunks in hand", self.plan.round, len(self.pending))
        pending, self.pending = self.pending, []
        for delivery in pending:
            await delivery.ack()

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        telemetry.REJECTED.labels(reason).inc()
        log.warning("rejected (%s): %s", reason, detail)

