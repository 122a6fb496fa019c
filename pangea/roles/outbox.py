"""What the orchestrator tells the other roles and the people watching, besides parameters: round
plans, each round's progress (on the bus, and in TensorBoard event files in the run's directory)
and the autoscaling signal.  Plans of a round whose batches are already out, and a finished
round's progress, are stored while the round loop goes on (off the critical path); each is
awaited before whatever must come after it.  One part of the orchestrator."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from pangea import telemetry
from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.roles.demand import Demand
from pangea.train.events import EventLog
from pangea.wire import codec
from pangea.wire.messages import RoundPlan

log = logging.getLogger(__name__)


def _background(work) -> asyncio.Task:
    """A task whose failure is raised where it is awaited, and retrieved even if it never is
    (an orchestrator that stops for another reason would print "Task exception was never
    retrieved" with a traceback)."""
    task = asyncio.create_task(work)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


class Outbox:
    def __init__(self, bus: Bus, job: str, demand: Demand) -> None:
        self.bus, self.job = bus, job
        self.demand = demand  # the autoscaling decision, published by `publish_demand`
        self.ahead: tuple[RoundPlan, list] | None = None  # the next round's plan, published ahead, and its cut
        self._planning: asyncio.Task | None = None  # plans being stored
        self._reporting: asyncio.Task | None = None  # the last round's progress, being stored
        self.events: EventLog | None = None  # the run's TensorBoard event files, once the first round is known

    def open_events(self, directory: Path, first_round: int, targets_per_sample: int) -> EventLog:
        """Start the run's event files (a resumed run's drop what an earlier writer wrote from `first_round` on)."""
        self.events = EventLog(directory, first_round=first_round, targets_per_sample=targets_per_sample)
        return self.events

    async def publish_plan(self, *plans: RoundPlan) -> None:
        """Store plans on the plans stream, in order (after any being stored in the background)."""
        await self.plans_stored()
        await self._store(plans)

    def plans_later(self, *plans: RoundPlan) -> None:
        """Store plans in the background; `plans_stored` (or the next `publish_plan`) waits for them."""
        previous = self._planning

        async def store() -> None:
            if previous is not None:
                await previous
            await self._store(plans)

        self._planning = _background(store())

    async def _store(self, plans: tuple[RoundPlan, ...]) -> None:
        await self.bus.publish(
            (
                subjects.plans(self.job),
                codec.encode(p),
                f"plan:{p.generation}:{p.round}:{p.attempt}:{int(p.final)}:{int(p.ahead)}",
            )
            for p in plans
        )

    async def plans_stored(self) -> None:
        """Wait until the plans given to `plans_later` are stored (a failure raises here)."""
        if self._planning is not None:
            task, self._planning = self._planning, None
            await task

    def report(self, done: bytes) -> None:
        """A round's progress (event, job bucket, autoscaling signal), stored while the next round
        runs, in order: each report waits for the one before."""
        previous = self._reporting

        async def store() -> None:
            if previous is not None:
                await previous
            await self.bus.publish_event(subjects.rounds(self.job), done)
            await self.bus.kv_put(subjects.job_bucket(self.job), subjects.JobKey.ROUND, done)
            await self.publish_demand()

        self._reporting = _background(store())

    async def reported(self) -> None:
        """Wait for the last round's progress to be stored (a failure to store it raises here)."""
        if self._reporting is not None:
            task, self._reporting = self._reporting, None
            await task

    async def publish_demand(self) -> None:
        """The autoscaling signal: the gauge every round, the job bucket's `desired` key when it changes."""
        decision = self.demand.decision
        telemetry.DESIRED.set(decision.desired)
        telemetry.AUTOSCALE.update(job=self.job, desired=decision.desired, why=decision.why)
        news = self.demand.news()
        if news is not None:
            value = json.dumps({"desired": news.desired, "why": news.why}).encode()
            await self.bus.kv_put(subjects.job_bucket(self.job), subjects.JobKey.DESIRED, value)
            log.info("desired workers: %d (%s)", news.desired, news.why)
