"""Reading the job spec that the orchestrator stores on the bus."""

from __future__ import annotations

import asyncio
import logging
import time

from pangea import codec
from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.messages import JobSpec

log = logging.getLogger(__name__)


async def wait_for_job_spec(bus: Bus, poll: float = 0.2) -> JobSpec:
    """The job's spec, waiting (and saying so every few seconds) until the orchestrator wrote it."""
    announced = time.monotonic()
    while True:
        raw = await bus.kv_get(subjects.job_bucket(bus.job), "spec")
        if raw is not None:
            return codec.decode(raw, JobSpec)
        if time.monotonic() - announced > 5:
            log.info("waiting for job %r: no orchestrator has created it yet", bus.job)
            announced = time.monotonic()
        await asyncio.sleep(poll)
