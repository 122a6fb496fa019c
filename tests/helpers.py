"""Helpers the tests share: the `pangea` command as a process, its environment, and checks of
what a user sees (fixtures live in conftest.py; `Cluster` in cluster.py; exactness in yardstick.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from pangea.bus import subjects

REPO = Path(__file__).resolve().parent.parent


def pangea_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pangea", *args]


def role_env(nats_url: str | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without PANGEA_* leftovers, plus the given settings.

    Health/metrics servers are off (PANGEA_HTTP_PORT=0) unless a test asks for a port: no
    test may depend on the default port 8000 being free on the machine it runs on.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    if nats_url:
        env["PANGEA_NATS_URL"] = nats_url
    env["PANGEA_HTTP_PORT"] = "0"
    env.update({f"PANGEA_{k.upper()}": str(v) for k, v in extra.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pangea(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(pangea_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def start_run(out: Path, job: str, nats_url: str, *args: str, **settings: object) -> subprocess.Popen:
    """`pangea run` in the background, with short membership timings unless `settings` say otherwise."""
    return subprocess.Popen(
        pangea_cmd("run", "--job", job, "--out", str(out), *args),
        env=role_env(nats_url, **{"member_ttl": 3, "heartbeat_seconds": 0.5, **settings}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_log(path: Path, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in {path}")


def kill_mid_run(out: Path, job: str, nats_url: str | None, role: str, *args: str, after: float = 1.5) -> str:
    """Start `pangea run`, SIGKILL one of its roles once training began; wait for the run to
    end and return its stderr (the run itself must succeed)."""
    proc = start_run(out, job, nats_url, *args)
    try:
        wait_for_log(out / "logs" / "orchestrator.log", "starting at round")
        time.sleep(after)
        os.kill(json.loads((out / "pids.json").read_text())[role], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


async def violations(url: str, job: str, **credentials) -> list[str]:
    """With a worker's credentials (nats.connect keywords), publish what only other roles may;
    the server's permission errors, as the client sees them."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, **credentials, error_cb=on_error)
    await nc.publish(subjects.params(job), b"forged parameters")
    await nc.publish(subjects.batches(job, "w1"), b"forged batch")
    await nc.publish(subjects.plans(job), b"forged plan")
    await nc.flush()
    await asyncio.sleep(0.5)
    await nc.close()
    return errors
