"""The orchestrator: owns the model and optimizer, plans rounds, averages, steps, broadcasts.

Round r, read top to bottom:
  plan r (live members, shards of global batch r) -> plans stream
  collect every chunk of every shard's gradient for round r (stale/duplicate/foreign refused);
    a shard whose worker left is re-issued to a live worker at once, a shard still missing at
    the deadline is re-issued to an idle worker (policy exact) or dropped (policy quorum)
  sample-weighted mean -> optimizer step -> params version r+1 -> params stream
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, replace

import numpy as np

from pangea import codec, diloco, telemetry
from pangea.aggregate import Rejected, RoundAccumulator, split_batch
from pangea.bus import subjects
from pangea.bus.client import Bus, BusError, Delivery
from pangea.checkpoint import Checkpoint
from pangea.chunking import split
from pangea.data import load_dataset, position
from pangea.layout import Layout
from pangea.messages import Gradient, Heartbeat, JobSpec, Params, RoundDone, RoundPlan, Shard, Tensor
from pangea.models import build_model
from pangea.outputs import Metrics, write_outputs
from pangea.planning import adaptive_deadline, pick_replacements
from pangea.roles import intake
from pangea.roles.asynchronous import AsyncTrainer
from pangea.roles.slices import Slices
from pangea.settings import OrchestratorSettings
from pangea.training import Diverged, batch_rows, epochs_ended, evaluate, make_optimizer, total_rounds

log = logging.getLogger(__name__)
SENDER = "orchestrator"
LATEST = "latest"  # the checkpoint a restarted orchestrator resumes from


class Orchestrator:
    """Runs a job from round 0 to the end; `run()` returns the metrics it wrote."""

    def __init__(self, settings: OrchestratorSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.job = settings.job
        self.dataset = load_dataset(settings.dataset)
        self.model = build_model(
            settings.model, self.dataset.input_shape, self.dataset.num_classes, settings.hidden_sizes, settings.seed
        )
        self.layout = Layout.of(self.model)
        if settings.mode == "diloco":  # the outer optimizer, applied to the mean pseudo-gradient
            self.optimizer = diloco.outer_optimizer(settings.outer_lr, settings.outer_momentum, self.layout.params(self.model))
        else:
            self.optimizer = make_optimizer(settings, self.layout.params(self.model))
        self.num_samples = len(self.dataset.x_train)
        self.total_steps = total_rounds(settings, self.dataset)  # global batches in the run
        self.total_rounds = (
            diloco.rounds(self.total_steps, settings.local_steps) if settings.mode == "diloco" else self.total_steps
        )
        self._bytes: dict[tuple[str, int], int] = {}  # (worker, pid) -> gradient bytes it published
        self.rejected: Counter[str] = Counter()
        self.metrics = Metrics(job=self.job, mode="run", settings=settings.model_dump(mode="json"))
        self.known_members: list[str] = []
        self.assigned: dict[int, set[str]] = {}  # shard -> every worker it was given this round
        self._late: set[tuple[int, int]] = set()  # (round, shard) re-issued or dropped: late copies expected
        self.generation = 0
        self.start_round = 0
        self._attempt = 0
        self._clean_seconds: list[float] = []  # durations of rounds that needed no re-issue
        self._non_finite: dict[int, set[str]] = {}  # shard -> senders of NaN/Inf gradients this round
        self.slices = Slices(self.layout.numel, settings.shards)  # slice 0 ours, the rest the shards'

    # ------------------------------------------------------------------ setup

    async def start(self) -> None:
        """Create the job on the bus (streams, buckets, spec), or take it over from its checkpoint."""
        exists = await self.bus.job_exists()
        if exists and not self.settings.resume:
            raise BusError(
                f"job {self.job!r} already has rounds on this server: continue it with --resume, choose "
                f"another --job, or remove it with `pangea delete --job {self.job}`"
            )
        await self.bus.ensure_job_streams(self.layout.numel * 4)
        await self.bus.kv(subjects.members_bucket(self.job), ttl=self.settings.member_ttl)
        spec = JobSpec(
            job=self.job,
            sender=SENDER,
            model=self.settings.model,
            hidden=self.settings.hidden_sizes,
            input_shape=self.dataset.input_shape,
            num_classes=self.dataset.num_classes,
            num_params=self.layout.numel,
            layout_hash=self.layout.hash,
            total_rounds=self.total_rounds,
            seed=self.settings.seed,
            dataset=self.settings.dataset,
            batch_size=self.settings.batch_size,
            epochs=self.settings.epochs,
            optimizer=self.settings.optimizer,
            lr=self.settings.lr,
            momentum=self.settings.momentum,
            weight_decay=self.settings.weight_decay,
            source_job=self.settings.source_job or "",
            compression=self.settings.compression,
            topk_fraction=self.settings.topk_fraction,
            shards=self.settings.shards,
            mode=self.settings.mode,
            local_steps=self.settings.local_steps,
            inner_optimizer=self.settings.inner_optimizer,
            inner_lr=self.settings.inner_lr,
            staleness=self.settings.staleness,
        )
        kv = await self.bus.kv(subjects.job_bucket(self.job))
        # Each orchestrator that runs the job is a new generation: its plans and parameters
        # supersede those of a predecessor, even for a round number it already reached.
        previous = await self.bus.kv_get(subjects.job_bucket(self.job), "generation")
        self.generation = int(previous) + 1 if previous else 0
        await kv.put("generation", str(self.generation).encode())
        await kv.put("spec", codec.encode(spec))
        if exists:
            await self.restore()
        elif self.settings.source_job and self.settings.from_round > 0:
            await self.start_from_source(self.settings.from_round)
        self._grads = await self.bus.pull("grads", subjects.grads(self.job), durable="orchestrator", batch=256)
        if self.slices.count > 1:
            self._reduced = await self.bus.pull("grads", subjects.reduced(self.job), durable="orchestrator-reduced", batch=256)
        self._backlog = await self.bus.pull(
            "batches", subjects.batches(self.job), durable=subjects.BACKLOG_CONSUMER, batch=512,
            headers_only=True,  # counting and acknowledging needs no payload
        )
        self._backlog_drained = 0.0
        log.info(
            "job %s: %s on %s, %d parameters, %d rounds of %d samples",
            self.job, self.settings.model, self.dataset.name, self.layout.numel, self.total_rounds,
            self.settings.batch_size,
        )

    async def members(self) -> list[str]:
        """Live workers, sorted by id: a key in the members bucket, which the server expires
        PANGEA_MEMBER_TTL seconds after the last heartbeat (the server's clock, not the workers')."""
        items = await self.bus.kv_items(subjects.members_bucket(self.job))
        live = []
        for worker, raw in items.items():
            try:
                beat = codec.decode(raw, Heartbeat)
            except codec.CodecError as exc:
                self._reject("malformed", f"heartbeat {worker}: {exc}")
                continue
            if beat.worker == worker and beat.job == self.job:
                live.append(worker)
                self._bytes[worker, beat.pid] = max(self._bytes.get((worker, beat.pid), 0), beat.bytes_sent)
        return sorted(live)

    async def wait_for_members(self, minimum: int) -> list[str]:
        announced = 0.0
        while True:
            members = await self.members()
            if len(members) >= minimum:
                return members
            if time.monotonic() - announced > 5:
                log.info("waiting for workers: %d of %d present", len(members), minimum)
                announced = time.monotonic()
            await asyncio.sleep(0.1)

    async def restore(self) -> None:
        """Take over from the last checkpoint (or from round 0 if there is none)."""
        raw = await self.bus.get_object(subjects.checkpoint_bucket(self.job), LATEST)
        if raw is None:
            self._event(0, "resume", f"generation {self.generation}: no checkpoint, starting again from round 0")
            return
        ckpt = self._load(Checkpoint.from_bytes(raw))
        self._event(ckpt.round, "resume", f"generation {self.generation}: resumed from the checkpoint of round {ckpt.round}")

    async def start_from_source(self, round_: int) -> None:
        """A replay from `round_`: start at the source job's latest checkpoint at or before it."""
        source = self.settings.source_job
        bucket = subjects.checkpoint_bucket(source)
        stored = sorted(int(n.split("-")[1]) for n in await self.bus.list_objects(bucket) if n.startswith("round-"))
        usable = [k for k in stored if k <= round_]
        if not usable:
            raise BusError(
                f"job {source!r} has no checkpoint at or before round {round_} (it keeps rounds {stored or 'none'})"
            )
        ckpt = self._load(Checkpoint.from_bytes(await self.bus.get_object(bucket, f"round-{usable[-1]}")))
        self.metrics.job, self.metrics.settings = self.job, self.settings.model_dump(mode="json")
        self._event(ckpt.round, "replay", f"replaying {source} from its checkpoint of round {ckpt.round}")

    def _load(self, ckpt: Checkpoint) -> Checkpoint:
        if ckpt.layout_hash != self.layout.hash:
            raise BusError(f"the checkpoint of job {self.job!r} is for another model layout")
        self.layout.load_params(self.model, ckpt.params)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.metrics = Metrics(**ckpt.metrics)
        self.rejected.update(self.metrics.rejected)
        self.start_round = ckpt.round
        return ckpt

    async def checkpoint(self, rounds_done: int) -> None:
        """Store parameters, optimizer state, round and metrics in the job's Object Store bucket:
        as the latest, and as `round-<n>` (the last PANGEA_CHECKPOINT_KEEP), for replays."""
        self.metrics.rejected = dict(self.rejected)
        ckpt = Checkpoint(
            rounds_done, self.layout.flatten_params(self.model), self.optimizer.state_dict(),
            asdict(self.metrics), self.layout.hash,
        )
        bucket, data = subjects.checkpoint_bucket(self.job), ckpt.to_bytes()
        await self.bus.put_object(bucket, LATEST, data)
        await self.bus.put_object(bucket, f"round-{rounds_done}", data)
        kept = sorted(int(n.split("-")[1]) for n in await self.bus.list_objects(bucket) if n.startswith("round-"))
        for old in kept[: max(0, len(kept) - self.settings.checkpoint_keep)]:
            await self.bus.delete_object(bucket, f"round-{old}")

    # ------------------------------------------------------------------ the loop

    async def run(self) -> Metrics:
        await self.start()
        first = self.start_round
        started = time.perf_counter() - self.metrics.total_seconds
        if first < self.total_rounds:
            members = await self.wait_for_members(self.settings.workers if first == 0 else 1)
            log.info("starting at round %d with %d workers: %s", first, len(members), ", ".join(members))
            self.known_members = members
            await self.publish_params(first)
            if self.settings.mode == "async":
                await AsyncTrainer(self).run()
            else:
                for r in range(first, self.total_rounds):
                    await self.train_round(r)
            self.metrics.total_seconds = time.perf_counter() - started
            await self.count_bytes()
        else:
            log.info("job %s had already finished all %d rounds", self.job, self.total_rounds)
        self.metrics.final_test_accuracy = self.metrics.test_accuracy[-1] if self.metrics.test_accuracy else float("nan")
        self.metrics.rejected = dict(self.rejected)
        await self.checkpoint(self.total_rounds)
        write_outputs(self.settings.out, self.layout, self.layout.flatten_params(self.model), self.metrics)
        # Only now tell the other roles the job is over: had we died before, a successor
        # would still need them.
        await self.bus.kv_put(subjects.job_bucket(self.job), "finished", str(self.total_rounds).encode())
        await self.publish_plan(RoundPlan(self.job, SENDER, self.total_rounds, 0, 0, 0, (), final=True,
                                          generation=self.generation))
        log.info("done: final test accuracy %.4f, outputs in %s", self.metrics.final_test_accuracy, self.settings.out)
        return self.metrics

    async def train_round(self, r: int) -> None:
        t0 = time.perf_counter()
        n, size = self.num_samples, self.settings.batch_size
        covered = self.round_steps(r)  # global batches: one (sync) or H (diloco)
        epoch, step = position(covered[0], n, size)
        rows = batch_rows(n, size, step)
        members = await self.current_members(r)
        shards = tuple(Shard(w, a, b) for w, a, b in split_batch(rows, members))
        plan = RoundPlan(self.job, SENDER, r, epoch, step, rows, shards, generation=self.generation,
                         inner_steps=len(covered))
        await self.publish_plan(plan)
        # A shard's samples: its rows of every global batch the round covers.
        sizes = {i: sum(b - a for a, b in (diloco.shard_rows(n, size, g, len(shards), i) for g in covered))
                 for i in range(len(shards))}

        robust = self.settings.aggregator != "mean" or self.settings.clip_norm > 0
        acc = RoundAccumulator(r, self.slices.size(0), sizes, keep_rows=robust)
        self.slices.new_round(r)
        await self.collect(plan, acc)
        if robust:
            mean = acc.robust(self.settings.aggregator, self.settings.byzantine, self.settings.clip_norm)
        elif acc.complete:
            mean = acc.mean()
        else:
            mean = acc.partial_mean()
            self._event(r, "quorum", f"closed with {acc.complete_samples()} of {rows} samples "
                        f"(missing shards {acc.missing()})")
            self.metrics.quorum_rounds.append({"round": r, "samples": acc.complete_samples(), "planned": rows})

        self.layout.set_grads(self.model, self.slices.join(mean), copy=False)  # a fresh vector: no copy
        self.optimizer.step()
        flat = self.layout.flatten_params(self.model)
        if not np.isfinite(flat.sum(dtype=np.float64)):  # one pass; NaN/Inf anywhere makes the sum so
            raise Diverged(
                f"training diverged at round {r}: the parameters are no longer finite "
                "(lower --lr, or use a robust --aggregator if a worker may send poisoned gradients)"
            )
        ended = epochs_ended(covered, n, size)  # a diloco round may end several epochs
        epoch_done = ended > 0
        accuracy = evaluate(self.model, self.dataset.x_test, self.dataset.y_test) if epoch_done else float("nan")
        if r + 1 < self.total_rounds:
            await self.publish_params(r + 1, flat=flat)
        seconds = time.perf_counter() - t0  # plan to broadcast, evaluation included

        self.metrics.loss.append(acc.loss())
        self.metrics.round_seconds.append(seconds)
        if self._attempt == 0 and acc.complete:
            self._clean_seconds.append(seconds)
        self.metrics.samples.append(acc.complete_samples())
        self.metrics.workers.append(len(shards))
        self.metrics.test_accuracy += [accuracy] * ended
        every = self.settings.checkpoint_every
        if every and (r + 1) % every == 0 and r + 1 < self.total_rounds:
            await self.checkpoint(r + 1)  # after the broadcast: a successor redoes at most this round
        done = RoundDone(
            self.job, SENDER, r, self.total_rounds, epoch, acc.loss(), seconds, acc.complete_samples(), accuracy,
            tuple(self.known_members), tuple(self.metrics.round_seconds[-20:]),
        )
        await self._drain_backlog()
        telemetry.ROUNDS.inc()
        telemetry.ROUND_SECONDS.observe(seconds)
        telemetry.SAMPLES.inc(acc.complete_samples())
        telemetry.LOSS.set(acc.loss())
        telemetry.MEMBERS.set(len(self.known_members))
        payload = codec.encode(done)
        await self.bus.publish_event(subjects.rounds(self.job), payload)
        await self.bus.kv_put(subjects.job_bucket(self.job), "round", payload)
        if epoch_done:
            log.info("epoch %d done (round %d/%d): loss %.4f, test accuracy %.4f",
                     len(self.metrics.test_accuracy), r + 1, self.total_rounds, acc.loss(), accuracy)

    async def count_bytes(self) -> None:
        """Gradient bytes each worker sent, from their heartbeats: wait for one more beat each,
        so that the last round's bytes are in (a restarted worker process counts from 0 again)."""
        await asyncio.sleep(1.5 * self.settings.heartbeat_seconds)
        await self.members()
        per_worker: Counter[str] = Counter(self.metrics.bytes_sent)  # from before a resume
        for (worker, _), sent in self._bytes.items():
            per_worker[worker] += sent
        self.metrics.bytes_sent = dict(sorted(per_worker.items()))

    def round_steps(self, r: int) -> range:
        """The global batches round r covers: r itself (sync), or H of them from r*H (diloco)."""
        if self.settings.mode == "diloco":
            return diloco.round_steps(r, self.settings.local_steps, self.total_steps)
        return range(r, r + 1)

    async def _drain_backlog(self, every: float = 1.0) -> None:
        """Acknowledge, at most once a second, every batch published so far on the backlog
        consumer: they all belong to closed rounds (the next plan is not out yet)."""
        if time.monotonic() - self._backlog_drained < every:
            return
        self._backlog_drained = time.monotonic()
        while (delivery := await self._backlog.next(timeout=0.02)) is not None:
            await delivery.ack()

    async def current_members(self, r: int) -> list[str]:
        """Live members for round r (waiting for one if there is none); joins and leaves logged."""
        members = await self.members() or await self.wait_for_members(1)
        joined = sorted(set(members) - set(self.known_members))
        left = sorted(set(self.known_members) - set(members))
        if self.known_members and joined:
            self._event(r, "join", f"joined: {', '.join(joined)}")
        if left:
            self._event(r, "leave", f"left: {', '.join(left)}")
        self.known_members = members
        return members

    def deadline(self) -> float:
        s = self.settings
        if s.straggler_deadline > 0:
            return s.straggler_deadline
        # Only rounds that needed no re-issue: a round stretched by a deadline must not
        # stretch the next deadline (that would grow without bound).
        return adaptive_deadline(self._clean_seconds[-10:], s.deadline_factor, s.deadline_floor, s.deadline_cap)

    async def collect(self, plan: RoundPlan, acc: RoundAccumulator) -> None:
        """Pull gradient chunks until every shard is complete, re-issuing shards of lost or slow workers.

        Returns with the round incomplete only under policy quorum, at the deadline.
        """
        owners = {i: s.worker for i, s in enumerate(plan.shards)}
        self.assigned = {i: {s.worker} for i, s in enumerate(plan.shards)}
        self._non_finite: dict[int, set[str]] = {}
        self._attempt = 0
        now = time.monotonic()
        deadline, next_check, warn_at = now + self.deadline(), now + 0.5, now + self.settings.round_warn_seconds
        while not (acc.complete and self.slices.complete):
            if not acc.complete:
                delivery = await self._grads.next(timeout=0.2 if self.slices.complete else 0.05)
                if delivery is not None:
                    self.intake(plan, acc, delivery)
                    await delivery.ack()
            if not self.slices.complete:
                delivery = await self._reduced.next(timeout=0.2 if acc.complete else 0.05)
                if delivery is not None:
                    self._reject_reduced(self.slices.add(plan, self.generation, delivery.payload, self.bus.max_payload))
                    await delivery.ack()
            if acc.complete and self.slices.complete:
                break
            # A worker that died while publishing may have sent our slice but not a shard's:
            # once ours is complete, every shard of the round is a suspect until the rest arrive.
            suspects = acc.missing() or (list(range(len(plan.shards))) if not self.slices.complete else [])
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.5
                live = await self.members()
                self._check_divergence(plan, acc, live)
                gone = {s: owners[s] for s in suspects if owners[s] not in live}
                if gone:
                    await self.reissue(plan, owners, gone, live, acc, "left the job")
            if now >= deadline:
                if self.settings.policy == "quorum" and acc.complete_samples() > 0:
                    self._late.update((plan.round, s) for s in acc.missing())
                    return
                slow = {s: owners[s] for s in suspects}
                await self.reissue(plan, owners, slow, await self.members(), acc, "missed the deadline")
                deadline = now + self.deadline()
            if now >= warn_at:
                waiting = [owners[s] for s in acc.missing()] + self.slices.missing_names()
                log.warning("round %d still waiting for %s", plan.round, ", ".join(waiting))
                warn_at = now + self.settings.round_warn_seconds

    async def reissue(
        self, plan: RoundPlan, owners: dict[int, str], shards: dict[int, str], live: list[str],
        acc: RoundAccumulator, why: str,
    ) -> None:
        """Give `shards` to other live workers: a new attempt of the plan, re-published by the preprocessor."""
        missing = set(acc.missing())
        idle = [w for w in live if all(owners[s] != w for s in missing)]
        choice = pick_replacements(shards, live, idle, self.assigned)
        if not choice:
            return
        self._attempt += 1
        self._late.update((plan.round, s) for s in choice)
        for shard, worker in choice.items():
            self._event(plan.round, "reassign", f"shard {shard} of {owners[shard]} ({why}) -> {worker}")
            owners[shard] = worker
            self.assigned[shard].add(worker)
        shards_now = tuple(replace(s, worker=owners[i]) for i, s in enumerate(plan.shards))
        await self.publish_plan(replace(plan, shards=shards_now, attempt=self._attempt, reissue=tuple(sorted(choice))))

    def intake(self, plan: RoundPlan, acc: RoundAccumulator, delivery: Delivery) -> bool:
        """Validate one gradient chunk and add it to the round; refusals are logged and counted.

        Checked in order: size, wire format, kind, job, generation, sender, round, shard
        ownership, parameter version, tensor name/dtype/shape, finiteness, duplicates.
        """
        if len(delivery.payload) > self.bus.max_payload:
            return self._reject("oversized", f"{len(delivery.payload)} bytes on the gradient subject")
        try:
            grad = codec.decode(delivery.payload, Gradient)
        except codec.CodecError as exc:
            return self._reject(exc.reason, str(exc))
        try:
            self._check(plan, grad)
            acc.add(grad.shard, grad.num_samples, grad.loss, grad.chunk, intake.values(grad))
        except Rejected as exc:
            if exc.reason == "non_finite":
                self._non_finite.setdefault(grad.shard, set()).add(grad.sender)
            if exc.reason == "duplicate" and (plan.round, grad.shard) in self._late:
                exc.reason = "straggler_late"  # a re-issued shard's second copy: expected
            return self._reject(exc.reason, f"from {grad.sender!r}: {exc.detail}")
        return True

    def _check_divergence(self, plan: RoundPlan, acc: RoundAccumulator, live: list[str]) -> None:
        """NaN/Inf gradients for every missing shard, from two workers each (or from the only
        one there is): the model itself diverged, and waiting would never end."""
        missing = acc.missing()
        if missing and all(len(self._non_finite.get(s, ())) >= min(2, max(1, len(live))) for s in missing):
            raise Diverged(
                f"training diverged at round {plan.round}: every worker computes NaN/Inf gradients "
                "(lower --lr, or use a robust --aggregator if a worker may send poisoned gradients)"
            )

    def _check(self, plan: RoundPlan, grad: Gradient) -> None:
        intake.check(
            grad, plan, job=self.job, generation=self.generation, compression=self.settings.compression,
            assigned=self.assigned, members=self.known_members, late=self._late,
        )

    # ------------------------------------------------------------------ publishing

    async def publish_plan(self, plan: RoundPlan) -> None:
        msg_id = f"plan:{plan.generation}:{plan.round}:{plan.attempt}:{int(plan.final)}"
        await self.bus.publish([(subjects.plans(self.job), codec.encode(plan), msg_id)])

    async def publish_params(self, version: int, final: bool = False, flat: np.ndarray | None = None) -> None:
        """Broadcast the current parameters (`flat`, if already flattened) as `version`, chunked to fit the server."""
        flat = self.layout.flatten_params(self.model) if flat is None else flat
        subject = subjects.params(self.job)

        def items():
            for chunk, values in split(flat, self.bus.chunk_bytes):
                msg = Params(self.job, SENDER, version, final, self.layout.hash, chunk, Tensor.from_numpy(values),
                             self.generation)
                yield subject, codec.encode(msg), f"params:{self.generation}:{version}:{chunk.index}"

        await self.bus.publish(items())

    # ------------------------------------------------------------------ bookkeeping

    def _reject_reduced(self, refusal: tuple[str, str] | None) -> None:
        if refusal is not None:
            self._reject(*refusal)

    def _reject(self, reason: str, detail: str) -> bool:
        self.rejected[reason] += 1
        telemetry.REJECTED.labels(reason).inc()
        log.warning("rejected (%s): %s", reason, detail)
        return False

    def _event(self, r: int, kind: str, detail: str) -> None:
        log.info("round %d: %s", r, detail)
        self.metrics.events.append({"round": r, "kind": kind, "detail": detail})

