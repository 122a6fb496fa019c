"""The orchestrator: owns the model and optimizer, plans rounds, averages, steps, broadcasts.

Round r, read top to bottom:
  plan r (live members, shards of global batch r) -> plans stream
  collect every chunk of every shard's gradient for round r (stale/duplicate/foreign refused);
    a shard whose worker left is re-issued to a live worker at once, a shard still missing at
    the deadline is re-issued to an idle worker (policy exact) or dropped (policy quorum)
  mean (summed loss-sum gradients over summed counts) -> optimizer step -> params version r+1 -> params stream

Why one module of ~520 lines: it is that loop, kept readable top to bottom (setup, the round,
collecting it, publishing).  Everything with a job of its own is a part it composes, each in
its module and testable without it: Membership (who may be planned), CheckpointStore,
GradientIntake (size, decode, check, add), Slices (the shards' means), Inbox (its consumers),
Deadlines (how long a round waits), Demand (the autoscaling signal), Server (model, optimizer,
evaluation), and AsyncTrainer for `--mode async`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.client import Bus, ConsumerLost
from pangea.errors import Diverged, JobError, ModelError, Rejected
from pangea.roles.asynchronous import AsyncTrainer
from pangea.roles.checkpoints import CheckpointStore
from pangea.roles.code import publish_code
from pangea.roles.demand import Demand
from pangea.roles.gradients import GradientIntake
from pangea.roles.inbox import Inbox
from pangea.roles.jobspec import spec_from_settings, wait_for_preprocessor
from pangea.roles.membership import Membership
from pangea.roles.outbox import Outbox
from pangea.roles.planning import Deadlines, pick_replacements
from pangea.roles.slices import Slices
from pangea.settings import OrchestratorSettings
from pangea.train import kernels, plans
from pangea.train.aggregate import RoundAccumulator, sums_on_wire
from pangea.train.checkpoint import Checkpoint
from pangea.train.data import position
from pangea.train.outputs import Metrics, write_outputs
from pangea.train.server import Server
from pangea.train.training import epochs_ended, evaluations_due, learning_rates
from pangea.wire import codec
from pangea.wire.chunking import split
from pangea.wire.messages import Params, RoundDone, RoundPlan, Shard, Tensor

log = logging.getLogger(__name__)
SENDER = "orchestrator"


class Orchestrator:
    """Runs a job from round 0 to the end; `run()` returns the metrics it wrote."""

    def __init__(self, settings: OrchestratorSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.server = Server.build(settings)
        self.metrics = Metrics(  # what the job did: rounds, events, refusals by reason
            job=settings.job,
            mode="run",
            settings=settings.model_dump(mode="json"),
            targets_per_sample=self.server.data.targets_per_sample,
        )
        self.generation = 0
        self.deadline = Deadlines(
            settings.straggler_deadline, settings.deadline_factor, settings.deadline_floor, settings.deadline_cap
        )
        self.membership = Membership(
            bus,
            self.job,
            heartbeat_seconds=settings.heartbeat_seconds,
            overdue_beats=settings.overdue_beats,
            event=self.event,
            refuse=self.reject,
        )
        self.checkpoints = CheckpointStore(bus, self.job, settings.checkpoint_keep)
        self.gradients: GradientIntake | None = None  # once connected: it needs the server's max payload
        self.slices = Slices(self.server.layout.numel, settings.shards)  # slice 0 ours, the rest the shards'
        self.inbox: Inbox | None = None  # once connected
        demand = Demand(
            settings.workers,
            settings.min_workers or settings.workers,
            settings.max_workers or settings.workers,
            efficiency=settings.scale_efficiency,
            cooldown=settings.scale_cooldown,
        )
        self.outbox = Outbox(bus, self.job, demand)  # plans, progress and the autoscaling signal out

    @property
    def job(self) -> str:
        return self.settings.job

    # ------------------------------------------------------------------ setup

    async def start(self) -> int:
        """Create the job on the bus (streams, buckets, spec), or take it over from its checkpoint;
        the round to start at."""
        exists = await self.bus.job_exists()
        if exists and not self.settings.resume:
            raise JobError(
                f"job {self.job!r} already has rounds on this server: continue it with --resume, choose "
                f"another --job, or remove it with `pangea delete --job {self.job}`"
            )
        await self.bus.ensure_job_streams(self.server.layout.numel * 4)
        await self.bus.kv(subjects.members_bucket(self.job), ttl=self.settings.member_ttl)
        await self.membership.watch(self.settings.member_ttl)
        spec = spec_from_settings(
            self.settings,
            SENDER,
            input_shape=self.server.data.input_shape,
            num_classes=self.server.data.num_classes,
            num_params=self.server.layout.numel,
            layout_hash=self.server.layout.hash,
            total_rounds=self.server.total_rounds,
            vocab=self.server.data.num_classes if self.server.task.is_lm else 0,
            param_numel=self.server.layout.param_numel,
        )
        kv = await self.bus.kv(subjects.job_bucket(self.job))
        # Pickled user code before the spec that names it: a worker that reads the spec finds it.
        s = self.settings
        await publish_code(
            self.bus, [s.model, s.step, s.optimizer, s.task, s.dataset, s.transform, s.collate], s.code_dir
        )
        # Each orchestrator that runs the job is a new generation: its plans and parameters
        # supersede those of a predecessor, even for a round number it already reached.
        previous = await self.bus.kv_get(subjects.job_bucket(self.job), subjects.JobKey.GENERATION)
        self.generation = int(previous) + 1 if previous else 0
        await kv.put(subjects.JobKey.GENERATION, str(self.generation).encode())
        await kv.put(subjects.JobKey.SPEC, codec.encode(spec))
        first = 0
        if exists:
            first = await self.restore()
        elif self.settings.source_job and self.settings.from_round > 0:
            first = await self.start_from_source(self.settings.from_round)
        self.gradients = GradientIntake(self.job, self.settings.compression, self.bus.max_payload, self.reject)
        self.inbox = await Inbox.open(self.bus, sliced=self.slices.count > 1)
        log.info(
            "job %s: %s on %s, %d parameters, %d rounds of %d samples",
            self.job,
            self.settings.model,
            self.server.data.name,
            self.server.layout.numel,
            self.server.total_rounds,
            self.settings.batch_size,
        )
        await self.outbox.publish_demand()
        return first

    async def restore(self) -> int:
        """Take over from the last checkpoint (or from round 0 if there is none)."""
        ckpt = await self.checkpoints.latest()
        if ckpt is None:
            self.event(0, "resume", f"generation {self.generation}: no checkpoint, starting again from round 0")
            return 0
        self._load(ckpt)
        self.event(
            ckpt.round, "resume", f"generation {self.generation}: resumed from the checkpoint of round {ckpt.round}"
        )
        return ckpt.round

    async def start_from_source(self, round_: int) -> int:
        """A replay from `round_`: start at the source job's latest checkpoint at or before it."""
        source = self.settings.source_job
        ckpt = self._load(await self.checkpoints.at_or_before(source, round_))
        self.metrics.job, self.metrics.settings = self.job, self.settings.model_dump(mode="json")
        self.event(ckpt.round, "replay", f"replaying {source} from its checkpoint of round {ckpt.round}")
        return ckpt.round

    def _load(self, ckpt: Checkpoint) -> Checkpoint:
        if ckpt.layout_hash != self.server.layout.hash:
            raise ModelError(f"the checkpoint of job {self.job!r} is for another model layout")
        self.server.layout.load_params(self.server.model, ckpt.params)
        self.server.load_optimizer(ckpt.optimizer)
        counted = self.metrics.rejected  # before the checkpoint's (none yet, as a rule)
        self.metrics = Metrics(**ckpt.metrics)
        for reason, n in counted.items():
            self.metrics.rejected[reason] = self.metrics.rejected.get(reason, 0) + n
        return ckpt

    async def checkpoint(self, rounds_done: int, flat: np.ndarray | None = None) -> None:
        """Store parameters (`flat`, if already flattened: no second copy), optimizer state, round
        and metrics (the latest, and the last PANGEA_CHECKPOINT_KEEP per round, for replays)."""
        await self.checkpoints.save(self._snapshot(rounds_done, flat))

    def checkpoint_later(self, rounds_done: int, flat: np.ndarray | None = None) -> None:
        """`checkpoint`, serialised now and stored while the rounds go on."""
        self.checkpoints.save_later(self._snapshot(rounds_done, flat))

    def _snapshot(self, rounds_done: int, flat: np.ndarray | None) -> Checkpoint:
        self._record_kernels()
        return Checkpoint(
            rounds_done,
            self.server.layout.flatten_params(self.server.model) if flat is None else flat,
            self.server.optimizer.state_dict(),
            self.metrics.fields_shared(),  # the live metrics: save/save_later serialise before they return or await
            self.server.layout.hash,
        )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> Metrics:
        first = await self.start()
        tokens = self.server.data.targets_per_sample if self.server.task.is_lm else 1
        with self.outbox.open_events(self.settings.out, first, tokens):
            return await self._run(first)

    async def _run(self, first: int) -> Metrics:
        started = time.perf_counter() - self.metrics.total_seconds
        if first < self.server.total_rounds:
            # Parameters first: a worker is ready (may be planned) once it holds them, so
            # its start-up never counts against the first round's deadline.  A new job (a
            # replay from a round included: its workers start with it) waits for --workers;
            # a successor resuming mid-run takes over with whoever is there.  A new job also
            # waits for its preprocessor to have its data, for the same reason.
            await self.publish_params(first)
            fresh = first == 0 or self.generation == 0
            if fresh:
                await wait_for_preprocessor(self.bus)
            members = await self.membership.wait(self.settings.workers if fresh else 1)
            log.info("starting at round %d with %d workers: %s", first, len(members), ", ".join(members))
            self.membership.known = members
            if self.settings.mode == "async":
                await AsyncTrainer(self).run()
            else:
                for r in range(first, self.server.total_rounds):
                    await self.train_round(r)
            await self.outbox.reported()
            self.metrics.total_seconds = time.perf_counter() - started
            self.metrics.bytes_sent = await self.membership.bytes_sent(self.metrics.bytes_sent)
        else:
            log.info("job %s had already finished all %d rounds", self.job, self.server.total_rounds)
        await self.checkpoint(self.server.total_rounds)
        write_outputs(
            self.settings.out, self.server.layout, self.server.layout.flatten_params(self.server.model), self.metrics
        )
        # Only now tell the other roles the job is over: had we died before, a successor
        # would still need them.
        await self.bus.kv_put(
            subjects.job_bucket(self.job), subjects.JobKey.FINISHED, str(self.server.total_rounds).encode()
        )
        self.outbox.demand.finished()
        await self.outbox.publish_demand()
        await self.outbox.publish_plan(
            RoundPlan(self.job, SENDER, self.server.total_rounds, 0, 0, 0, (), final=True, generation=self.generation)
        )
        log.info(
            "done: %s, outputs in %s",
            ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.metrics.final.items()) or "no evaluation",
            self.settings.out,
        )
        await self.membership.close()
        return self.metrics

    def plan_round(self, r: int, members: list[str], ahead: bool = False) -> tuple[RoundPlan, list]:
        """Round r cut over `members`: its plan, and each shard's rows of every global batch it covers."""
        n, size = self.server.num_samples, self.settings.batch_size
        covered = self.server.round_steps(r)  # global batches: one (sync) or H (diloco)
        epoch, step = position(covered[0], n, size)
        cut = plans.cut(n, size, covered, members)  # (worker, its rows of each covered batch)
        plan = RoundPlan(
            self.job,
            SENDER,
            r,
            epoch,
            step,
            plans.batch_rows(n, size, step),
            tuple(Shard(w, *rows[0]) for w, rows in cut),
            generation=self.generation,
            inner_steps=len(covered),
            ahead=ahead,
        )
        return plan, cut

    async def open_round(self, r: int) -> tuple[RoundPlan, list, dict[int, str]]:
        """Round r's plan, published, and the shards whose owner may no longer be planned.

        Round r was planned ahead, during round r-1, over the members then (its batches are
        with the workers already); it opens with that same plan, not published again (the
        preprocessor and the orchestrator shards take the plan made ahead as the round's).  A
        member that left or may not be planned since keeps its shard only until `collect`
        re-issues it, at once (the rows stay as planned: no sample is counted twice or lost); one
        that joined is planned from round r+1 on.  Then round r+1 is planned ahead over today's
        members."""
        members = await self.membership.for_round(r)
        ahead, self.outbox.ahead = self.outbox.ahead, None
        planned_ahead = ahead is not None and ahead[0].round == r
        if planned_ahead:
            plan, cut = replace(ahead[0], ahead=False), ahead[1]
        else:
            plan, cut = self.plan_round(r, members)
        publish = [] if planned_ahead else [plan]  # a round planned ahead opens without a message
        if r + 1 < self.server.total_rounds and self.settings.lookahead:
            self.outbox.ahead = self.plan_round(r + 1, members, ahead=True)
            publish.append(self.outbox.ahead[0])
        if not planned_ahead:
            await self.outbox.publish_plan(*publish)  # the workers wait for these batches
        elif publish:
            # The workers hold this round's batches: the next round's plan is stored while
            # gradients come (`collect` waits for it before it re-issues anything).
            self.outbox.plans_later(*publish)
        unplanned = {i: s.worker for i, s in enumerate(plan.shards) if s.worker not in members}
        return plan, cut, unplanned

    async def train_round(self, r: int) -> None:
        t0 = time.perf_counter()
        n, size = self.server.num_samples, self.settings.batch_size
        covered = self.server.round_steps(r)
        epoch, step = position(covered[0], n, size)
        plan, cut, unplanned = await self.open_round(r)
        shards = plan.shards
        sizes = {i: sum(b - a for a, b in rows) for i, (_, rows) in enumerate(cut)}

        robust = self.settings.aggregator != "mean" or self.settings.clip_norm > 0
        acc = RoundAccumulator(
            r,
            self.slices.size(0),
            sizes,
            keep_rows=robust,
            params_end=self.server.layout.param_numel,  # slice 0 starts the vector
            summed=sums_on_wire(self.settings.mode, self.settings.compression),
        )
        self.slices.new_round(r)
        await self.collect(plan, acc, unplanned)
        await self.outbox.plans_stored()
        if robust:
            mean = acc.robust(self.settings.aggregator, self.settings.byzantine, self.settings.clip_norm)
        elif acc.complete:
            mean = acc.mean()
        else:
            mean = acc.partial_mean()
            self.event(
                r,
                "quorum",
                f"closed with {acc.complete_samples()} of {acc.total_samples} samples (missing shards {acc.missing()})",
            )
            self.metrics.quorum_rounds.append(
                {"round": r, "samples": acc.complete_samples(), "planned": acc.total_samples}
            )

        self.server.step(self.slices.join(mean), r)
        del mean  # its memory goes back before the flat copy below exists: the peak is the float64 sum
        flat = self.server.layout.flatten_params(self.server.model)
        if not np.isfinite(flat.sum(dtype=np.float64)):  # one pass; NaN/Inf anywhere makes the sum so
            raise Diverged(
                f"training diverged at round {r}: the parameters are no longer finite "
                "(lower --lr, or use a robust --aggregator if a worker may send poisoned gradients)"
            )
        if r + 1 < self.server.total_rounds:
            await self.publish_params(r + 1, flat=flat)
        # Evaluated after the broadcast: the workers compute round r+1 meanwhile.
        ended = epochs_ended(covered, n, size)  # a diloco round may end several epochs
        due = evaluations_due(covered, n, size, self.settings.eval_every) or r + 1 == self.server.total_rounds
        figures = self.server.evaluate() if due else {}
        seconds = time.perf_counter() - t0  # plan to broadcast, evaluation included
        if not figures:  # an evaluation's time is not the workers' speed
            self.outbox.demand.observe(r, len(shards), acc.complete_samples(), seconds)
        self.metrics.desired_workers.append(self.outbox.demand.decision.desired)

        self.metrics.plans.append(self._record(r, covered, cut).to_dict())
        self.metrics.loss.append(acc.loss())
        self.metrics.round_seconds.append(seconds)
        self.deadline.round_ended(seconds, acc.complete)
        self.metrics.samples.append(acc.complete_samples())
        self.metrics.workers.append(len(shards))
        self.outbox.events.add_round(
            r,
            loss=acc.loss(),
            lrs=learning_rates(self.server.optimizer),
            samples=acc.complete_samples(),
            seconds=seconds,
            workers=len(shards),
        )
        if figures:
            self.metrics.add_evaluation(r, figures, ended)
            self.outbox.events.add_evaluation(r, figures)
        every = self.settings.checkpoint_every
        if every and (r + 1) % every == 0 and r + 1 < self.server.total_rounds:
            # After the broadcast, stored while round r+1 runs: a successor resumes from it, or from
            # the one before if this one was not stored yet.
            self.checkpoint_later(r + 1, flat)
        excluded = self.membership.excluded()
        done = RoundDone(
            self.job,
            SENDER,
            r,
            self.server.total_rounds,
            epoch,
            acc.loss(),
            seconds,
            acc.complete_samples(),
            figures.get(self.server.task.headline, float("nan")),
            tuple(self.membership.known),
            tuple(self.metrics.round_seconds[-20:]),
            tuple(excluded),
            tuple(excluded.values()),
            figure=self.server.task.headline,
            targets_per_sample=self.server.data.targets_per_sample,
        )
        telemetry.ROUNDS.inc()
        telemetry.ROUND_SECONDS.observe(seconds)
        telemetry.SAMPLES.inc(acc.complete_samples())
        telemetry.TOKENS.inc(
            acc.complete_samples() * self.server.data.targets_per_sample if self.server.task.is_lm else 0
        )
        telemetry.LOSS.set(acc.loss())
        telemetry.MEMBERS.set(len(self.membership.known))
        self.outbox.report(codec.encode(done))
        if figures:
            log.info(
                "round %d/%d (epoch %d): loss %.4f, %s",
                r + 1,
                self.server.total_rounds,
                epoch + 1,
                acc.loss(),
                ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in figures.items()),
            )

    def _record(self, r: int, covered: range, cut: list) -> plans.RoundRecord:
        """What round r computed, for `pangea verify`: each shard's rows, who was counted, their threads."""
        shards = []
        for i, (_, rows) in enumerate(cut):
            counted = tuple(sorted(self.gradients.counted.get(i, ())))
            threads = {self.membership.kernels.get(w, {}).get("threads", 0) for w in counted}
            shards.append(
                plans.ShardRecord(rows=rows, workers=counted, threads=threads.pop() if len(threads) == 1 else 0)
            )
        return plans.RoundRecord(round=r, first_step=covered[0], shards=tuple(shards))

    def _record_kernels(self) -> None:
        """metrics.json `kernels`: this process's (it steps the optimizer) and every worker's."""
        workers = {**self.metrics.kernels.get("workers", {}), **self.membership.kernels}  # from before a resume too
        self.metrics.kernels = {"optimizer": kernels.current().as_dict(), "workers": dict(sorted(workers.items()))}

    async def collect(self, plan: RoundPlan, acc: RoundAccumulator, unplanned: dict[int, str] | None = None) -> None:
        """Pull gradient chunks until every shard is complete, re-issuing shards of lost or slow workers.

        `unplanned`: shards (of a plan made a round ahead) whose owner may no longer be planned:
        re-issued before anything else.  Returns with the round incomplete only under policy
        quorum, at the deadline.
        """
        owners = {i: s.worker for i, s in enumerate(plan.shards)}
        self.gradients.new_round(plan)
        self.deadline.attempt = 0
        started = time.monotonic()
        arrived: list[float] = []  # seconds after the plan at which each shard completed
        deadline, next_check, warn_at = (
            started + self.deadline(),
            started + 0.5,
            started + self.settings.round_warn_seconds,
        )
        if unplanned:
            await self.outbox.plans_stored()
            await self.reissue(
                plan, owners, unplanned, await self.membership.live(), acc, "not plannable since it was planned"
            )
        while not (acc.complete and self.slices.complete):
            try:
                completed = await self._take_one(plan, acc)
            except ConsumerLost as exc:
                await self.restore_bus(plan, owners, acc, str(exc))
                deadline = time.monotonic() + self.deadline(arrived)
                continue
            if completed:
                arrived.append(time.monotonic() - started)
                if self.deadline.attempt == 0:  # no history yet: the round in hand sets the pace
                    deadline = min(deadline, started + self.deadline(arrived))
            if acc.complete and self.slices.complete:
                break
            # A worker that died while publishing may have sent our slice but not a shard's:
            # once ours is complete, every shard of the round is a suspect until the rest arrive.
            suspects = acc.missing() or (list(range(len(plan.shards))) if not self.slices.complete else [])
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.5
                live = await self.membership.live()
                self._check_divergence(plan, acc, live)
                now = time.monotonic()
                gone = {s: owners[s] for s in suspects if owners[s] not in live}
                stopped = {
                    s: w for s, w in ((s, owners[s]) for s in suspects) if s not in gone and self.membership.overdue(w)
                }
                for shards, why in ((gone, "left the job"), (stopped, "its heartbeats stopped")):
                    if shards and await self.reissue(plan, owners, shards, live, acc, why):
                        deadline = max(deadline, now + self.deadline(arrived))  # the new owners' time
            if now >= deadline:
                # Quarantine the owners we heard nothing from: one that sent NaN/Inf is alive (its
                # model diverged), and must stay plannable for the divergence check to get a second opinion.
                silent = {owners[s] for s in acc.missing() if owners[s] not in self.gradients.non_finite.get(s, ())}
                for worker in sorted(silent):
                    self.membership.quarantine(plan.round, worker, f"missed the deadline of round {plan.round}")
                if self.settings.policy == "quorum" and acc.complete_samples() > 0:
                    self.gradients.late.update((plan.round, s) for s in acc.missing())
                    return
                slow = {s: owners[s] for s in suspects}
                await self.reissue(plan, owners, slow, await self.membership.live(), acc, "missed the deadline")
                deadline = now + self.deadline(arrived)
            if now >= warn_at:
                waiting = [owners[s] for s in acc.missing()] + self.slices.missing_names()
                log.warning("round %d still waiting for %s", plan.round, ", ".join(waiting))
                warn_at = now + self.settings.round_warn_seconds

    async def _take_one(self, plan: RoundPlan, acc: RoundAccumulator) -> bool:
        """Take what came of the round's gradients (and, with --shards, its reduced slices), if
        anything did; True when that completed a shard."""
        completed = False
        if not acc.complete:
            delivery = await self.inbox.grads.next(timeout=0.2 if self.slices.complete else 0.05)
            if delivery is not None:
                missing = len(acc.missing())
                self.gradients.take(
                    plan, acc, delivery.payload, generation=self.generation, members=self.membership.known
                )
                await delivery.ack()
                completed = len(acc.missing()) < missing
        if not self.slices.complete:
            delivery = await self.inbox.reduced.next(timeout=0.2 if acc.complete else 0.05)
            if delivery is not None:
                try:
                    self.slices.add(plan, self.generation, delivery.payload, self.bus.max_payload)
                except Rejected as exc:
                    self.reject(exc.reason, exc.detail)
                await delivery.ack()
        return completed

    async def restore_bus(self, plan: RoundPlan, owners: dict[int, str], acc: RoundAccumulator, why: str) -> None:
        """The server lost the gradient and parameter streams (it restarted, and keeps them in
        memory): create them and our consumers again, publish the parameters of the round in
        hand again, and ask each shard not yet summed of its owner again (the gradients stored
        before the restart are gone).  At most this round is recomputed."""
        await self.bus.restore_job_streams()
        await self.inbox.reopen()
        await self.publish_params(plan.round)  # the model has not stepped since: this round's version
        again = acc.missing() if self.slices.complete else list(range(len(plan.shards)))
        self.event(plan.round, "restore", f"{why}: streams and parameters restored, shards {again} asked again")
        if again:
            await self._publish_attempt(plan, owners, again)

    async def reissue(
        self,
        plan: RoundPlan,
        owners: dict[int, str],
        shards: dict[int, str],
        live: list[str],
        acc: RoundAccumulator,
        why: str,
    ) -> None:
        """Give `shards` to other plannable workers: a new attempt of the plan, re-published by the
        preprocessor.  False if no worker could take any of them (they keep waiting)."""
        missing = set(acc.missing())
        candidates = self.membership.plannable(live)
        idle = [w for w in candidates if all(owners[s] != w for s in missing)]
        choice = pick_replacements(shards, candidates, idle, self.gradients.assigned)
        if not choice:
            return False
        for shard, worker in choice.items():
            self.event(plan.round, "reassign", f"shard {shard} of {owners[shard]} ({why}) -> {worker}")
            owners[shard] = worker
            self.gradients.give(shard, worker)
        await self._publish_attempt(plan, owners, choice)
        return True

    async def _publish_attempt(self, plan: RoundPlan, owners: dict[int, str], shards) -> None:
        """A new attempt of the round's plan: `shards` (computed again by their `owners`), the
        others as they were; a late copy of any of them is expected, not a duplicate."""
        await self.outbox.plans_stored()  # a re-issue comes after the plan it changes
        self.deadline.attempt += 1
        self.gradients.late.update((plan.round, s) for s in shards)
        shards_now = tuple(replace(s, worker=owners[i]) for i, s in enumerate(plan.shards))
        await self.outbox.publish_plan(
            replace(plan, shards=shards_now, attempt=self.deadline.attempt, reissue=tuple(sorted(shards)))
        )

    def _check_divergence(self, plan: RoundPlan, acc: RoundAccumulator, live: list[str]) -> None:
        """NaN/Inf gradients for every missing shard, from two workers each (or from the only
        one there is): the model itself diverged, and waiting would never end."""
        missing = acc.missing()
        if missing and all(len(self.gradients.non_finite.get(s, ())) >= min(2, max(1, len(live))) for s in missing):
            raise Diverged(
                f"training diverged at round {plan.round}: every worker computes NaN/Inf gradients "
                "(lower --lr, or use a robust --aggregator if a worker may send poisoned gradients)"
            )

    # ------------------------------------------------------------------ publishing

    async def publish_params(self, version: int, final: bool = False, flat: np.ndarray | None = None) -> None:
        """Broadcast the current parameters (`flat`, if already flattened) as `version`, chunked to fit the server."""
        flat = self.server.layout.flatten_params(self.server.model) if flat is None else flat
        subject = subjects.params(self.job)

        def items():
            for chunk, values in split(flat, self.bus.chunk_bytes):
                msg = Params(
                    self.job,
                    SENDER,
                    version,
                    final,
                    self.server.layout.hash,
                    chunk,
                    Tensor.from_numpy(values),
                    self.generation,
                )
                yield subject, codec.encode(msg), f"params:{self.generation}:{version}:{chunk.index}"

        await self.bus.publish(items())

    # ------------------------------------------------------------------ bookkeeping

    # The context both round strategies use (the sync loop here, AsyncTrainer for --mode async):
    # refusals counted by reason, membership events, both into metrics.json.

    def reject(self, reason: str, detail: str) -> bool:
        """Count and log a refused message; False, so a check can `return self.reject(...)`."""
        self.metrics.rejected[reason] = self.metrics.rejected.get(reason, 0) + 1
        telemetry.REJECTED.labels(reason).inc()
        log.warning("rejected (%s): %s", reason, detail)
        return False

    def event(self, r: int, kind: str, detail: str) -> None:
        """A membership or recovery event of round r: logged and kept in metrics.json."""
        log.info("round %d: %s", r, detail)
        self.metrics.events.append({"round": r, "kind": kind, "detail": detail})
