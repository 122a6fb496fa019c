"""Pangea's roles on lab hosts: the same `python -m pangea <role>` processes a deployment runs.

All the lab knows of Pangea is its command line and its PANGEA_* environment variables.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.netlab.topology import Host, Process

REPO = Path(__file__).resolve().parents[2]


def environment(nats_url: str, job: str, **settings: object) -> dict[str, str]:
    """This process's environment without PANGEA_* leftovers, plus the job's settings.

    The health/metrics port is off: several roles may share a host, as on a real machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    env.update(PANGEA_NATS_URL=nats_url, PANGEA_JOB=job, PANGEA_HTTP_PORT="0", PYTHONUNBUFFERED="1")
    env.update({f"PANGEA_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Job:
    """One job's roles, started on whichever hosts a test puts them."""

    def __init__(self, job: str, nats_url: str, **settings: object) -> None:
        self.job, self.nats_url, self.settings = job, nats_url, settings
        self.roles: dict[str, Process] = {}

    def start(
        self,
        host: Host,
        role: str,
        *args: str,
        name: str | None = None,
        nats_url: str | None = None,
        **settings: object,
    ) -> Process:
        """`pangea <role> *args` on `host`, connected to `nats_url` (default: the job's)."""
        env = environment(nats_url or self.nats_url, self.job, **{**self.settings, **settings})
        proc = host.spawn(name or role, [sys.executable, "-m", "pangea", role, *args], env, cwd=REPO)
        self.roles[name or role] = proc
        return proc

    def orchestrator(self, host: Host, *args: str, **settings: object) -> Process:
        return self.start(host, "orchestrator", *args, **settings)

    def preprocessor(self, host: Host, *args: str, **settings: object) -> Process:
        return self.start(host, "preprocessor", *args, **settings)

    def worker(self, host: Host, worker_id: str, *args: str, **settings: object) -> Process:
        return self.start(host, "worker", "--worker-id", worker_id, *args, name=worker_id, **settings)

    def wait(self, name: str, timeout: float) -> int:
        """The role's exit code; fails with the tail of its log if it does not exit in time."""
        proc = self.roles[name]
        try:
            return proc.wait(timeout)
        except Exception as exc:  # subprocess.TimeoutExpired
            raise AssertionError(
                f"{name} on {proc.host.name} still running after {timeout:.0f}s: {proc.log()[-3000:]}"
            ) from exc
