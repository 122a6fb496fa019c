"""`pangea autoscale`: local worker processes for every job on the server, as many as each asks for.

Each orchestrator publishes how many workers its job should have (`roles.demand`, the job
bucket's `desired` key); this controller reads the signal of every job on the server each
`--period` seconds and starts `pangea worker --job J` processes or stops them (SIGTERM: a
worker leaves after the shard in hand) until each job has that many, within
[`--min-workers`, `--max-workers`].  A job that is finished, or asks for none, gets none: with
no job the controller runs no workers, and a new job gets its workers without anyone naming it.
On Kubernetes, KEDA follows the same signal (infra/k8s/keda-scaledobject.yaml).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import time

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.settings import AutoscaleSettings

log = logging.getLogger(__name__)


class Autoscaler:
    def __init__(self, settings: AutoscaleSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.workers: dict[str, list[subprocess.Popen]] = {}  # job -> its workers, oldest first
        self.leaving: set[int] = set()  # pids told to leave
        self.started = 0
        self.stopping = False

    def request_stop(self) -> None:
        self.stopping = True

    async def run(self) -> None:
        busy = False  # some job asked for workers since we started
        try:
            while not self.stopping:
                wanted = await self.wanted()
                self.reconcile(wanted)
                busy = busy or any(wanted.values())
                if self.settings.until_idle and busy and not any(wanted.values()) and not self.alive():
                    log.info("autoscale: every job is finished and no worker runs: exiting")
                    return
                await asyncio.sleep(self.settings.period)
        finally:
            self.stop_all()

    async def wanted(self) -> dict[str, int]:
        """Workers each job on the server should have now."""
        wanted = {}
        for job in await self.bus.job_names():
            if not fnmatch.fnmatchcase(job, self.settings.jobs):
                continue
            bucket = subjects.job_bucket(job)
            raw = await self.bus.kv_get(bucket, subjects.JobKey.DESIRED)
            desired = json.loads(raw)["desired"] if raw else 0
            if desired and await self.bus.kv_get(bucket, subjects.JobKey.FINISHED) is not None:
                desired = 0  # an orchestrator that died between the two writes
            s = self.settings
            wanted[job] = min(max(desired, s.min_workers), s.max_workers) if desired else 0
        return wanted

    def alive(self) -> int:
        return sum(p.poll() is None for procs in self.workers.values() for p in procs)

    def reconcile(self, wanted: dict[str, int]) -> None:
        self.leaving &= {p.pid for procs in self.workers.values() for p in procs if p.poll() is None}
        for job in sorted(set(self.workers) | set(wanted)):
            procs = [p for p in self.workers.get(job, []) if p.poll() is None]
            staying = [p for p in procs if p.pid not in self.leaving]
            target = wanted.get(job, 0)
            if len(staying) != target:
                log.info("autoscale: job %s: %d -> %d workers", job, len(staying), target)
            for _ in range(target - len(staying)):
                procs.append(self._start(job))
            for proc in reversed(staying[target:]):  # the newest leave first
                proc.send_signal(signal.SIGTERM)
                self.leaving.add(proc.pid)
            self.workers[job] = procs

    def _start(self, job: str) -> subprocess.Popen:
        s = self.settings
        self.started += 1
        name = f"auto-{job}-{self.started}"
        env = {
            **{k: v for k, v in os.environ.items() if k != "PANGEA_HEALTH_FILE"},
            "PANGEA_JOB": job,
            "PANGEA_WORKER_ID": name,
            "PANGEA_TORCH_THREADS": str(s.torch_threads),
            "PANGEA_HTTP_PORT": "0",
        }
        if s.nats_url:
            env["PANGEA_NATS_URL"] = s.nats_url
        s.log_dir.mkdir(parents=True, exist_ok=True)
        with open(s.log_dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "pangea", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker still running (each leaves after its shard), SIGKILL after `timeout`."""
        procs = [p for ps in self.workers.values() for p in ps if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("autoscale: stopped; 0 workers running")
