"""`pangea autoscale`: as many workers for every job on the server as each asks for.

Each orchestrator publishes how many workers its job should have (`roles.demand`, the job
bucket's `desired` key); this controller reads the signal of every job on the server each
`--period` seconds and brings the workers to that many, within [`--min-workers`,
`--max-workers`].  A job that is finished, or asks for none, gets none: with no job the
controller runs no workers, and a new job gets its workers without anyone naming it.

Two ways to have workers (one class each):
- `LocalWorkers` (the default): `pangea worker --job J` processes on this host, stopped with
  SIGTERM (a worker leaves after the shard in hand); stopping the controller stops them.
- `ComposeWorkers` (`--compose "docker compose -f … -p …"`): the worker service of a compose
  deployment, scaled with `up -d --no-deps --no-recreate --scale worker=N worker`; compose stops
  the surplus containers the same way (SIGTERM, then its stop_grace_period).  Its workers serve
  the job their compose environment names, so `--jobs` should name that one job; the
  containers belong to the deployment and stay at their last scale when the controller stops.
On Kubernetes, KEDA follows the same signal (infra/k8s/keda-scaledobject.yaml).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Protocol

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.errors import EXIT_USER_ERROR, SettingsError
from pangea.settings import AutoscaleSettings

log = logging.getLogger(__name__)


class Workers(Protocol):
    """Where the workers run: brought to the count each job wants, counted, let go at the end."""

    def reconcile(self, wanted: dict[str, int]) -> None: ...

    def alive(self) -> int: ...

    def close(self) -> None: ...


class Autoscaler:
    def __init__(self, settings: AutoscaleSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.workers: Workers = ComposeWorkers(settings) if settings.compose else LocalWorkers(settings)
        self.stopping = False

    def request_stop(self) -> None:
        self.stopping = True

    async def run(self) -> None:
        try:
            log.info("autoscale: %d workers running at start", await asyncio.to_thread(self.workers.alive))
        except ComposeError as exc:  # a command that cannot work: say so once, do not retry
            raise SettingsError(f"--compose (PANGEA_COMPOSE): {exc}") from None
        busy = False  # some job asked for workers since we started
        try:
            while not self.stopping:
                wanted = await self.wanted()
                try:
                    await asyncio.to_thread(self.workers.reconcile, wanted)
                except ComposeError as exc:  # a busy or restarting engine: the next period tries again
                    log.warning("autoscale: %s", exc)
                busy = busy or any(wanted.values())
                if self.settings.until_idle and busy and not any(wanted.values()):
                    if not await asyncio.to_thread(self._alive_or_unknown):
                        log.info("autoscale: every job is finished and no worker runs: exiting")
                        return
                await asyncio.sleep(self.settings.period)
        finally:
            self.workers.close()

    def _alive_or_unknown(self) -> int:
        try:
            return self.workers.alive()
        except ComposeError as exc:
            log.warning("autoscale: %s", exc)
            return -1  # not known: not idle

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


class LocalWorkers:
    """`pangea worker` processes on this host, per job.

    A worker that fails is not simply started again each period: one that exits with a user
    error (exit 2: a setting, a data set; a restart cannot fix it) stops the controller from
    starting more for its job, said once with the worker's last log line; one that crashes
    otherwise is replaced after a doubling wait (2 s ... 60 s).
    """

    HOLD_CAP = 60.0  # seconds: the longest wait before replacing a crashed worker

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self.procs: dict[str, list[subprocess.Popen]] = {}  # job -> its workers, oldest first
        self.leaving: set[int] = set()  # pids told to leave
        self.started = 0
        self.crashes: dict[str, int] = {}  # job -> crashes of its workers so far
        self.held_until: dict[str, float] = {}  # job -> no new worker before this (monotonic)
        self.refused: set[str] = set()  # jobs whose worker exited with a user error
        self.names: dict[int, str] = {}  # pid -> worker id, which names its log

    def alive(self) -> int:
        return sum(p.poll() is None for procs in self.procs.values() for p in procs)

    def reconcile(self, wanted: dict[str, int]) -> None:
        for job, procs in self.procs.items():
            for proc in procs:
                if proc.poll() not in (None, 0) and proc.pid not in self.leaving:
                    self._failed(job, proc)
        self.leaving &= {p.pid for procs in self.procs.values() for p in procs if p.poll() is None}
        now = time.monotonic()
        for job in sorted(set(self.procs) | set(wanted)):
            procs = [p for p in self.procs.get(job, []) if p.poll() is None]
            staying = [p for p in procs if p.pid not in self.leaving]
            target = wanted.get(job, 0)
            more = target - len(staying)
            if more > 0 and (job in self.refused or now < self.held_until.get(job, 0.0)):
                more = 0
            if more or len(staying) > target:
                log.info("autoscale: job %s: %d -> %d workers", job, len(staying), min(target, len(staying) + more))
            for _ in range(more):
                procs.append(self._start(job))
            for proc in reversed(staying[target:]):  # the newest leave first
                proc.send_signal(signal.SIGTERM)
                self.leaving.add(proc.pid)
            self.procs[job] = procs

    def _failed(self, job: str, proc: subprocess.Popen) -> None:
        """Called once per failed worker (reconcile drops it from `procs` right after)."""
        name = self.names.pop(proc.pid, "?")
        last = _last_line(self.settings.log_dir / f"{name}.log")
        if proc.returncode == EXIT_USER_ERROR:
            if job not in self.refused:
                log.error("autoscale: job %s: a worker exited %d (%s): starting no more for this job",
                          job, proc.returncode, last)  # fmt: skip
            self.refused.add(job)
            return
        self.crashes[job] = self.crashes.get(job, 0) + 1
        hold = min(2.0 ** self.crashes[job], self.HOLD_CAP)
        self.held_until[job] = time.monotonic() + hold
        log.warning("autoscale: job %s: worker %s exited %d (%s): next one in %.0fs",
                    job, name, proc.returncode, last, hold)  # fmt: skip

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
            proc = subprocess.Popen(
                [sys.executable, "-m", "pangea", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.names[proc.pid] = name
        return proc

    def close(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker still running (each leaves after its shard), SIGKILL after `timeout`."""
        procs = [p for ps in self.procs.values() for p in ps if p.poll() is None]
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


def _last_line(path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[-300:] if lines else "no output"


class ComposeWorkers:
    """The worker service of a docker compose deployment, scaled to what the jobs want in all."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.command = shlex.split(settings.compose)
        self.service = settings.compose_service
        self.applied: int | None = None  # the scale last asked of compose

    def _compose(self, *args: str, timeout: float = 300) -> str:
        argv = [*self.command, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ComposeError(f"`{shlex.join(argv)}` failed: {exc}") from None
        if done.returncode != 0:
            raise ComposeError(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def alive(self) -> int:
        return len(self._compose("ps", "-q", "--status", "running", self.service).split())

    def reconcile(self, wanted: dict[str, int]) -> None:
        target = sum(wanted.values())
        if target == self.applied:
            return
        log.info("autoscale: compose service %s: %s -> %d workers (%s)", self.service,
                 "?" if self.applied is None else self.applied, target,
                 ", ".join(f"{job} {n}" for job, n in sorted(wanted.items())) or "no job")  # fmt: skip
        self._compose("up", "-d", "--no-deps", "--no-recreate", "--scale", f"{self.service}={target}", self.service)
        self.applied = target

    def close(self) -> None:
        if self.applied is not None:
            log.info("autoscale: stopped; the compose service %s stays at %d workers", self.service, self.applied)


class ComposeError(RuntimeError):
    """A `docker compose` call failed: the message names the command and what it said."""
