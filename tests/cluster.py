"""Test helpers: roles started by hand as real processes, and waiting on a job's progress."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

from pangea.bus import subjects
from pangea.bus.client import Bus
from pangea.settings import BusSettings
from pangea.wire import codec
from pangea.wire.messages import RoundDone
from tests.helpers import pangea_cmd, role_env


class Cluster:
    """Roles of one job as separate `pangea <role>` processes; everything is killed on close."""

    def __init__(self, nats_url: str, job: str, tmp_path: Path, **settings) -> None:
        self.nats_url, self.job, self.dir = nats_url, job, tmp_path
        self.env = role_env(nats_url, job=job, member_ttl=3, heartbeat_seconds=0.5, **settings)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, **env: object) -> subprocess.Popen:
        extra = {f"PANGEA_{k.upper()}": str(v) for k, v in env.items()}
        with open(self.dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(pangea_cmd(*args), env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def worker(self, worker_id: str, **env: object) -> subprocess.Popen:
        return self.start(worker_id, "worker", "--worker-id", worker_id, **env)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def wait(self, name: str, timeout: float = 300) -> int:
        code = self.procs[name].wait(timeout=timeout)
        assert code == 0 or name.startswith("w"), f"{name} exited {code}: {self.log(name)[-3000:]}"
        return code

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    def wait_for_round(self, n: int, timeout: float = 180) -> int:
        """Block until the orchestrator finished round n (0-based); the last finished round."""
        return asyncio.run(_wait_for(self.nats_url, self.job, lambda done: done.round >= n, f"round {n}", timeout))

    def wait_for_planned(self, *workers: str, timeout: float = 180) -> int:
        """Block until a finished round had every one of `workers` as a member the orchestrator
        plans (ready, beating, not quarantined); that round."""

        def planned(done: RoundDone) -> bool:
            return set(workers) <= set(done.workers) - set(done.excluded_workers)

        return asyncio.run(_wait_for(self.nats_url, self.job, planned, f"{', '.join(workers)} planned", timeout))


async def _wait_for(nats_url: str, job: str, condition, what: str, timeout: float) -> int:
    bus = await Bus.connect(BusSettings(nats_url=nats_url, job=job), "test")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = await bus.kv_get(subjects.job_bucket(job), "round")
            if raw is not None:
                done = codec.decode(raw, RoundDone)
                if condition(done):
                    return done.round
            await asyncio.sleep(0.05)
    finally:
        await bus.close()
    raise AssertionError(f"job {job} never got to {what}")


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())
